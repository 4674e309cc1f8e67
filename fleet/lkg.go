package fleet

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// LastGoodFile is the last policy a daemon applied from etcd, in its state
// directory.
const LastGoodFile = "fleet-last-good.json"

// lastGood is the file's content: the documents the host merged (not the
// merged text), so that a policy booted from it is the same bytes, the same
// hash and the same error positions as when it came from etcd.
type lastGood struct {
	Host     string            `json:"host"`
	Revision int64             `json:"revision"`
	Docs     map[string][]byte `json:"docs"`
}

// SaveLastGood keeps s's documents that concern h, and the fleet-wide
// revocations, as the last good policy: a host that boots cut off from
// etcd keeps what was revoked.
func SaveLastGood(dir string, h Host, s Snapshot) error {
	lg := lastGood{Host: h.Name, Revision: s.Revision, Docs: map[string][]byte{}}
	for _, k := range h.Keys() {
		if d, ok := s.Docs[k]; ok {
			lg.Docs[k] = d
		}
	}
	for k, d := range s.Docs {
		if strings.HasPrefix(k, RevokePrefix) {
			lg.Docs[k] = d
		}
	}
	data, err := json.Marshal(lg)
	if err != nil {
		return err
	}
	path := filepath.Join(dir, LastGoodFile)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("save last good policy: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("save last good policy: %w", err)
	}
	return nil
}

// ErrNoLastGood: this host never applied a policy from etcd.
var ErrNoLastGood = errors.New("no last good policy from etcd in the state directory")

// LoadLastGood reads the last good policy kept in dir.
func LoadLastGood(dir string) (Snapshot, error) {
	path := filepath.Join(dir, LastGoodFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return Snapshot{}, ErrNoLastGood
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("read last good policy: %w", err)
	}
	var lg lastGood
	if err := json.Unmarshal(data, &lg); err != nil {
		return Snapshot{}, fmt.Errorf("read last good policy %s: %w", path, err)
	}
	return Snapshot{Revision: lg.Revision, Docs: lg.Docs}, nil
}
