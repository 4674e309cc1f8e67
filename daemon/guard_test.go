package daemon

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// fakeGroupTools puts a getent and a groupadd on PATH that know one group,
// name, once groupadd made it (gid 64999), and nothing else; with
// groupadd false, there is no groupadd.
func fakeGroupTools(t *testing.T, name string, groupadd bool) {
	t.Helper()
	dir := t.TempDir()
	made := filepath.Join(dir, "made")
	getent := `#!/bin/sh
db=$1; shift
[ "$1" = "--" ] && shift
if [ "$db" = group ] && [ "$1" = "` + name + `" ] && [ -e "` + made + `" ]; then echo "` + name + `:x:64999:"; exit 0; fi
if [ "$db" = passwd ] && [ $# = 0 ]; then /bin/cat /etc/passwd; exit 0; fi
exit 2
`
	write := func(file, text string) {
		if err := os.WriteFile(filepath.Join(dir, file), []byte(text), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write("getent", getent)
	if groupadd {
		write("groupadd", "#!/bin/sh\n[ \"$1 $2 $3\" = \"--system -- "+name+"\" ] || exit 3\n/usr/bin/touch "+made+"\n")
	}
	t.Setenv("PATH", dir)
}

func TestResolveGuard(t *testing.T) {
	const group = "procgate-guard-fake"
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tt := range []struct {
		name     string
		cfg      Config
		groupadd bool
		wantGID  uint32
		wantErr  []string
	}{
		{name: "the group is created when missing", cfg: Config{GuardGroup: group}, groupadd: true, wantGID: 64999},
		{name: "no groupadd: said clearly", cfg: Config{GuardGroup: group},
			wantErr: []string{"trace guard group " + group, "groupadd is not installed", "--guard-gid off"}},
		{name: "nobody's group is refused", cfg: Config{GuardGID: 65534},
			wantErr: []string{"--guard-gid 65534 is the primary group of", "nobody", "could not be trace-guarded"}},
		{name: "root's group is refused", cfg: Config{GuardGID: 0, GuardGroup: "root"}, wantErr: []string{"group root (gid 0)", "root"}},
		{name: "a gid no user has", cfg: Config{GuardGID: 65533}, wantGID: 65533},
		{name: "off", cfg: Config{GuardGID: 65534, NoTraceGuard: true}, wantGID: 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			fakeGroupTools(t, group, tt.groupadd)
			cfg := tt.cfg
			err := resolveGuard(&cfg, quiet)
			if len(tt.wantErr) > 0 {
				if err == nil {
					t.Fatalf("no error, guard gid %d; want %q", cfg.GuardGID, tt.wantErr)
				}
				for _, w := range tt.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error lacks %q: %v", w, err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.GuardGID != tt.wantGID {
				t.Errorf("guard gid %d, want %d", cfg.GuardGID, tt.wantGID)
			}
		})
	}
}

// TestZeroConfigGuards: Config{} turns every guard on; the CLI only turns
// them off or relaxes them. A bool field is how a guard gets switched off,
// so every bool of Config must be listed here with the value that keeps
// its guard on: a new one fails this test until someone decides.
func TestZeroConfigGuards(t *testing.T) {
	cfg := Config{PolicyPath: "p.yaml"}
	if err := cfg.setDefaults(); err != nil {
		t.Fatal(err)
	}
	guardOn := map[string]bool{
		"NoUDPHandover":   false, // the UDP handover check on
		"TrustTraceGuard": false, // the TCP handover guard watches every app connection
		"NoTraceGuard":    false, // launched apps run with the guard's gid
	}
	v := reflect.ValueOf(cfg)
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if f.Type.Kind() != reflect.Bool {
			continue
		}
		want, ok := guardOn[f.Name]
		if !ok {
			t.Errorf("Config.%s is a bool this test does not know: add it to guardOn with the value that keeps its guard on", f.Name)
			continue
		}
		if got := v.Field(i).Bool(); got != want {
			t.Errorf("Config{}.%s = %v after defaults, want %v (guard on)", f.Name, got, want)
		}
	}
	for _, c := range []struct {
		name string
		ok   bool
		got  any
	}{
		{"GuardGroup is procgate-guard", cfg.GuardGroup == "procgate-guard", cfg.GuardGroup},
		{"PinholeIdle closes stale holes", cfg.PinholeIdle > 0, cfg.PinholeIdle},
		{"DNSGrace adds no grace", cfg.DNSGrace == 0, cfg.DNSGrace},
		{"MetricsAddr serves nothing", cfg.MetricsAddr == "", cfg.MetricsAddr},
		{"GatewayURL runs no agent", cfg.GatewayURL == "", cfg.GatewayURL},
	} {
		if !c.ok {
			t.Errorf("Config{} after defaults: want %s, got %v", c.name, c.got)
		}
	}
}
