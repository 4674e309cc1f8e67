//go:build procgate_docs

// The man pages and shell completions, generated from the command line
// itself so that they never drift from it. Only a build with the
// procgate_docs tag has this file (the Makefile's docs target):
//
//	go run -tags procgate_docs ./cmd/procgate gen-docs DIR
//
// writes DIR/man/man1/*.1 and DIR/completions/{procgate.bash,_procgate,
// procgate.fish}. The shipped binary has neither the generator nor
// cobra/doc's dependencies.

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"

	"github.com/procgate/procgate/internal/version"
)

// init takes over before main: the generator is not a command of the CLI,
// or it would document itself.
func init() {
	if len(os.Args) < 2 || os.Args[1] != "gen-docs" {
		return
	}
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: procgate gen-docs DIR")
		os.Exit(2)
	}
	if err := genDocs(rootCmd(), os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "gen-docs:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func genDocs(root *cobra.Command, dir string) error {
	man := filepath.Join(dir, "man", "man1")
	comp := filepath.Join(dir, "completions")
	for _, d := range []string{man, comp} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	// The date of the commit (SOURCE_DATE_EPOCH, set by the Makefile), so
	// that a rebuild of the same tree gives the same pages.
	date := time.Now()
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		sec, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return fmt.Errorf("SOURCE_DATE_EPOCH=%q: %w", s, err)
		}
		date = time.Unix(sec, 0).UTC()
	}
	root.DisableAutoGenTag = true
	header := &doc.GenManHeader{Title: "PROCGATE", Section: "1", Date: &date,
		Source: "procgate " + version.Get().Version, Manual: "procgate manual"}
	if err := doc.GenManTree(root, header, man); err != nil {
		return fmt.Errorf("man pages: %w", err)
	}
	for name, gen := range map[string]func(string) error{
		"procgate.bash": func(p string) error { return root.GenBashCompletionFileV2(p, true) },
		"_procgate":     root.GenZshCompletionFile,
		"procgate.fish": func(p string) error { return root.GenFishCompletionFile(p, true) },
	} {
		if err := gen(filepath.Join(comp, name)); err != nil {
			return fmt.Errorf("completion %s: %w", name, err)
		}
	}
	return nil
}
