package daemon

import "testing"

// TestConfigDefaults: a zero Config enforces the installed policy with the
// paths of the installed layout (README.md, under Install), as
// procgate.service runs it.
func TestConfigDefaults(t *testing.T) {
	var c Config
	if err := c.setDefaults(); err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct{ name, got, want string }{
		{"PolicyPath", c.PolicyPath, "/etc/procgate/policy.yaml"},
		{"StateDir", c.StateDir, "/var/lib/procgate"},
		{"BPFDir", c.BPFDir, "/sys/fs/bpf/procgate"},
		{"Socket", c.Socket, "/run/procgate/procgate.sock"},
	} {
		if f.got != f.want {
			t.Errorf("Config{}.%s = %q, want %q", f.name, f.got, f.want)
		}
	}
	c = Config{PolicyPath: "/srv/p.yaml"}
	if err := c.setDefaults(); err != nil || c.PolicyPath != "/srv/p.yaml" {
		t.Errorf("an explicit policy path became %q (%v)", c.PolicyPath, err)
	}
}
