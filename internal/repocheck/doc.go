// Package repocheck holds tests of the repository rather than of its code:
// that comments and the documentation cite only files that exist in the
// tree (cites_test.go). It has no code of its own; `go test
// ./internal/repocheck` runs the checks, without root.
package repocheck
