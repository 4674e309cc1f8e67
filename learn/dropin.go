package learn

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/procgate/procgate/policy"
)

// Check validates data as the file path of the policy at policyPath, read
// with every drop-in as the daemon reads them: path replaces the file of
// that name, or is added to them.
func Check(policyPath, path string, data []byte) error {
	files, err := policy.ReadFiles(policyPath)
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	added := false
	for i, f := range files {
		if fa, _ := filepath.Abs(f.Path); fa == abs {
			files[i].Data, added = data, true
		}
	}
	if !added {
		files = append(files, policy.File{Path: path, Data: data})
	}
	if _, _, err := policy.ParseFiles(files); err != nil {
		return fmt.Errorf("%s with the policy %s and its drop-ins does not validate, nothing written:\n%w", path, policyPath, err)
	}
	return nil
}

// Write checks data (Check) and writes it to path by a rename, so that the
// daemon, which follows the directory, never reads half a file.
func Write(policyPath, path string, data []byte) error {
	if err := Check(policyPath, path, data); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	// A hidden name: the daemon does not read it as a drop-in meanwhile.
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return errors.Join(fmt.Errorf("write %s: %w", path, err), os.Remove(tmp))
	}
	return nil
}

// DropinPath is where a drop-in named name goes for the policy at
// policyPath: its policy.d.
func DropinPath(policyPath, name string) string {
	return filepath.Join(filepath.Dir(policyPath), policy.DropinDir, name)
}
