package fleet

import (
	"errors"
	"fmt"

	"github.com/procgate/procgate/policy"
	"github.com/procgate/procgate/ruleset"
)

// Snapshot is the policy documents as of one etcd revision.
type Snapshot struct {
	// Revision is the etcd revision the documents were read at.
	Revision int64 `json:"revision"`
	// Docs are the documents by key.
	Docs map[string][]byte `json:"docs"`
	// ModRevisions are the documents' mod revisions by key (push's
	// compare-and-swap base); not kept on disk.
	ModRevisions map[string]int64 `json:"-"`
}

// ErrNoFleet is a snapshot without the fleet document: there is no policy
// to merge overlays into.
var ErrNoFleet = errors.New("no fleet document " + FleetKey + " in etcd (write one with: procgate policy push FILE)")

// Files are the documents host merges, in merge order, each as a policy
// file named by its key: the fleet document is the main file, the
// overlays are its drop-ins (policy.ParseFiles), so every error names the
// key and the line. Overlays that are not there are left out.
func (s Snapshot) Files(h Host) ([]policy.File, error) {
	fleet, ok := s.Docs[FleetKey]
	if !ok {
		return nil, ErrNoFleet
	}
	files := []policy.File{{Path: FleetKey, Data: fleet}}
	for _, k := range h.Keys()[1:] {
		if data, ok := s.Docs[k]; ok {
			files = append(files, policy.File{Path: k, Data: data})
		}
	}
	return files, nil
}

// Merge compiles host's policy from the snapshot.
func (s Snapshot) Merge(h Host) (*ruleset.Ruleset, []policy.File, error) {
	files, err := s.Files(h)
	if err != nil {
		return nil, nil, err
	}
	rs, _, err := policy.ParseFiles(files)
	if err != nil {
		return nil, files, err
	}
	return rs, files, nil
}

// Merged is host's merged policy as one policy text (policy.Format): what
// `procgate policy diff --host` compares.
func (s Snapshot) Merged(h Host) ([]byte, error) {
	rs, _, err := s.Merge(h)
	if err != nil {
		return nil, err
	}
	out, err := policy.Format(rs)
	if err != nil {
		return nil, fmt.Errorf("format the merged policy of %s: %w", h.Name, err)
	}
	return out, nil
}
