package bpf

import "testing"

// TestLSMCgroupLoadable: every lsm_cgroup program of the committed objects
// is one loadLSMCgroup can load. A CO-RE read that reaches one through a
// shared helper of decision.h would otherwise show only on a kernel that
// loads BPF LSM, as a guard off "for a missing feature".
func TestLSMCgroupLoadable(t *testing.T) {
	specs, err := loadHarden()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for name, p := range specs.Programs {
		if p.SectionName != "lsm_cgroup/"+p.AttachTo {
			continue
		}
		n++
		if err := lsmCgroupLoadable(p); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if n == 0 {
		t.Fatal("no lsm_cgroup program in harden.c's object")
	}
}
