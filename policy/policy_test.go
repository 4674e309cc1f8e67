package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/ruleset"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func ports(rs ...ruleset.PortRange) []ruleset.PortRange { return rs }

func port1(p uint16) ruleset.PortRange { return ruleset.PortRange{Lo: p, Hi: p} }

var allPorts = ports(ruleset.AllPorts)

const hash = "3f79bb7b435b05321651daefd374cdc681dc06faa65e374e38337b88ca046dea"

// backupUID is the uid of Debian's backup user, which example.yaml matches.
func backupUID(t *testing.T) uint32 {
	t.Helper()
	uid, err := LookupUser("backup")
	if err != nil {
		t.Fatalf("example.yaml matches the user backup (in Debian's base-passwd): %v", err)
	}
	return uid
}

func TestLoadValid(t *testing.T) {
	tests := []struct {
		file  string
		want  func(src func(int) ruleset.Source) *ruleset.Ruleset
		warns []string
	}{
		{
			file: "testdata/example.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal: []ruleset.InternalPrefix{
						{Prefix: pfx("10.0.0.0/8"), Source: src(15)},
						{Prefix: pfx("172.16.0.0/12"), Source: src(16)},
						{Prefix: pfx("fd00::/8"), Source: src(17)},
					},
					Interfaces: []string{"wg0"},
					AuditRate:  100,
					Everyone: []ruleset.Grant{
						{Index: 0, Prefix: pfx("10.0.0.53/32"), Proto: ruleset.UDP, Ports: ports(port1(53)), Source: src(104)},
					},
					Apps: []ruleset.App{
						{
							Name: "psql-prod", Source: src(28),
							Exe:   []ruleset.Exe{{Path: "/usr/bin/psql"}},
							Users: []string{"alice", "@dba"},
							Grants: []ruleset.Grant{
								{Index: 0, Prefix: pfx("10.1.2.0/24"), Proto: ruleset.TCP, Ports: ports(port1(5432)), Source: src(32)},
							},
						},
						{
							Name: "intranet-browser", Source: src(38),
							Exe:        []ruleset.Exe{{Path: "/usr/lib/firefox-esr/firefox-esr", SHA256: hash}},
							Users:      []string{"@staff"},
							AuditAllow: true,
							Grants: []ruleset.Grant{
								{Index: 0, Prefix: pfx("fd00:1::/64"), Proto: ruleset.Both, Ports: ports(port1(443), ruleset.PortRange{Lo: 8000, Hi: 8100}), Source: src(45)},
								{Index: 1, Prefix: pfx("10.20.0.10/32"), Proto: ruleset.Both, Ports: allPorts, Source: src(47)},
							},
						},
						{
							Name: "resolver", Source: src(50),
							Users: []string{"@users"},
							Grants: []ruleset.Grant{
								{Index: 0, Prefix: pfx("10.0.0.53/32"), Proto: ruleset.Both, Ports: ports(port1(53)), Source: src(53)},
								{Index: 1, Prefix: pfx("10.0.1.53/32"), Proto: ruleset.Both, Ports: ports(port1(53)), Source: src(55)},
							},
						},
						{Name: "quarantine", Source: src(60)},
						{
							Name: "backup", Source: src(65), Match: &ruleset.Match{Kind: ruleset.MatchUser, Value: "backup", UID: backupUID(t)},
							Grants: []ruleset.Grant{{Index: 0, Prefix: pfx("10.5.0.10/32"), Proto: ruleset.TCP, Ports: ports(port1(873)), Source: src(68)}},
						},
						{Name: "builder", Source: src(75), OutsideDeny: true, Listen: &ruleset.Listen{Ports: ports(port1(8080)), Source: src(77)}, Grants: []ruleset.Grant{
							{Index: 0, Prefix: pfx("192.0.2.80/32"), Proto: ruleset.TCP, Ports: ports(port1(443)), Source: src(79)},
						}},
						{
							Name: "web", Source: src(85), Match: &ruleset.Match{Kind: ruleset.MatchUnit, Value: "nginx.service", Path: "system.slice/nginx.service"},
							Grants: []ruleset.Grant{{Index: 0, Prefix: pfx("10.1.2.0/24"), Proto: ruleset.TCP, Ports: ports(port1(5432)), Source: src(88)}},
						},
						{
							Name: "builds", Source: src(93), Match: &ruleset.Match{Kind: ruleset.MatchCgroup, Value: "system.slice/docker-*.scope", Path: "system.slice/docker-*.scope"},
							Grants: []ruleset.Grant{{Index: 0, Prefix: pfx("10.30.0.0/16"), Proto: ruleset.TCP, Ports: ports(port1(443)), Source: src(96)}},
						},
					},
				}
			},
		},
		{
			file: "testdata/valid/minimal.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal:  []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8"), Source: src(3)}},
					AuditRate: DefaultAuditRate,
				}
			},
		},
		{
			file: "testdata/valid/keep-caps.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal:  []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8"), Source: src(3)}},
					AuditRate: DefaultAuditRate,
					Apps:      []ruleset.App{{Name: "vpn", Source: src(6), KeepCaps: []string{"net_admin", "net_raw"}}},
				}
			},
		},
		{
			file: "testdata/valid/app-options.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal:  []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8"), Source: src(3)}},
					AuditRate: DefaultAuditRate,
					Apps: []ruleset.App{
						{Name: "dev", Source: src(6), Traceable: true},
						{Name: "prod", Source: src(9)},
						{Name: "broker", Source: src(13), AllowHandover: true},
						{Name: "trial", Source: src(17), AuditOnly: true},
						{Name: "strict", Source: src(20)},
					},
				}
			},
		},
		{
			file: "testdata/valid/normalize.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal: []ruleset.InternalPrefix{
						{Prefix: pfx("10.0.0.0/8"), Source: src(4)},
						{Prefix: pfx("fd00::/8"), Source: src(4)},
						{Prefix: pfx("192.168.1.1/32"), Source: src(4)},
					},
					AuditRate: MaxAuditRate,
					Apps: []ruleset.App{{
						Name: "web.v2_a-b", Source: src(8),
						Exe:   []ruleset.Exe{{Path: "/opt/web/bin/web"}, {Path: "/opt/web/bin/web", SHA256: hash}},
						Users: []string{"root", "_svc", "deploy$", "@wheel", "bob@EXAMPLE.COM", "Carol.Smith", "1001", "@1002", "@dba@EXAMPLE.COM"},
						Grants: []ruleset.Grant{
							{Index: 0, Prefix: pfx("10.9.0.1/32"), Proto: ruleset.UDP, Source: src(15), Ports: ports(
								port1(80), port1(443), ruleset.PortRange{Lo: 8000, Hi: 8100}, ruleset.PortRange{Lo: 8050, Hi: 8060})},
							{Index: 1, Prefix: pfx("fd00:1::/64"), Proto: ruleset.Both, Ports: allPorts, Source: src(18)},
							{Index: 2, Prefix: pfx("10.0.0.0/8"), Proto: ruleset.Both, Ports: allPorts, Source: src(20)},
						},
					}},
				}
			},
		},
		{
			file: "testdata/valid/warnings.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal:  []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8"), Source: src(11)}},
					AuditRate: DefaultAuditRate,
					Apps: []ruleset.App{{
						Name: "app", Source: src(4),
						Grants: []ruleset.Grant{
							{Index: 0, Prefix: pfx("192.0.2.0/24"), Proto: ruleset.Both, Ports: allPorts, Source: src(6)},
							{Index: 1, Prefix: pfx("0.0.0.0/0"), Proto: ruleset.TCP, Ports: allPorts, Source: src(7)},
							{Index: 2, Prefix: pfx("2001:db8::1/128"), Proto: ruleset.Both, Ports: allPorts, Source: src(9)},
						},
					}},
				}
			},
			warns: []string{
				"testdata/valid/warnings.yaml:6:13: apps[0].allow[0].to: 192.0.2.0/24 is outside every internal prefix, so the grant has no effect (destinations outside are allowed anyway)",
				"testdata/valid/warnings.yaml:9:13: apps[0].allow[2].to: 2001:db8::1/128 is outside every internal prefix, so the grant has no effect (destinations outside are allowed anyway)",
			},
		},
		{
			file: "testdata/valid/interfaces.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Interfaces: []string{"wg0", "tun.corp-1"},
					AuditRate:  DefaultAuditRate,
					Apps: []ruleset.App{{
						Name: "vpn-client", Source: src(6),
						Grants: []ruleset.Grant{
							{Index: 0, Prefix: pfx("198.51.100.0/24"), Proto: ruleset.UDP, Ports: ports(port1(51820)), Source: src(9)},
						},
					}},
				}
			},
			warns: []string{
				"testdata/valid/interfaces.yaml:9:13: apps[0].allow[0].to: 198.51.100.0/24 is outside every internal prefix; it has an effect only where routes via wg0, tun.corp-1 make it internal",
			},
		},
		{
			file: "testdata/valid/inbound.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal:  []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8"), Source: src(3)}},
					AuditRate: DefaultAuditRate,
					Apps: []ruleset.App{
						{
							Name: "ftp", Source: src(5), Exe: []ruleset.Exe{{Path: "/usr/sbin/vsftpd"}},
							Inbound: &ruleset.Inbound{Control: ports(port1(21)), Ports: ports(ruleset.PortRange{Lo: 40000, Hi: 40100}),
								Proto: ruleset.TCP, Lease: 30 * time.Second, Source: src(9)},
						},
						{
							Name: "bulk", Source: src(13),
							Inbound: &ruleset.Inbound{Control: ports(port1(990), port1(2121)), Ports: ports(port1(5000), ruleset.PortRange{Lo: 6000, Hi: 6010}),
								Proto: ruleset.Both, Source: src(16)},
						},
						{
							Name: "named", Source: src(18),
							Inbound: &ruleset.Inbound{Ports: ports(port1(7000)), Proto: ruleset.UDP, Lease: 2 * time.Minute, Source: src(21)},
						},
					},
				}
			},
		},
		{
			// No warnings: a sandbox's grants outside internal prefixes,
			// and everyone's there, are what it reaches.
			file: "testdata/valid/sandbox.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal:  []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8"), Source: src(3)}},
					AuditRate: DefaultAuditRate,
					Everyone: []ruleset.Grant{
						{Index: 0, Prefix: pfx("10.0.0.53/32"), Proto: ruleset.UDP, Ports: ports(port1(53)), Source: src(6)},
					},
					Apps: []ruleset.App{
						{Name: "sandboxed", Source: src(11), OutsideDeny: true, Grants: []ruleset.Grant{
							{Index: 0, Prefix: pfx("10.1.2.0/24"), Proto: ruleset.Both, Ports: ports(port1(5432)), Source: src(14)},
							{Index: 1, Prefix: pfx("192.0.2.10/32"), Proto: ruleset.TCP, Ports: ports(port1(443)), Source: src(16)},
						}},
						{Name: "sealed", Source: src(20), OutsideDeny: true, LoopbackDeny: true},
						{Name: "open", Source: src(23)},
					},
				}
			},
		},
		{
			file: "testdata/valid/names.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal:  []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8"), Source: src(3)}},
					AuditRate: DefaultAuditRate,
					Everyone: []ruleset.Grant{
						{Index: 0, Prefix: pfx("10.0.0.53/32"), Proto: ruleset.UDP, Ports: ports(port1(53)), Source: src(6)},
					},
					Apps: []ruleset.App{
						{Name: "sandboxed", Source: src(10), OutsideDeny: true, Grants: []ruleset.Grant{
							{Index: 0, Name: "db.corp.example", Proto: ruleset.Both, Ports: ports(port1(5432)), Source: src(13)},
							// Lower case, without the final dot.
							{Index: 1, Name: "*.corp.example", Proto: ruleset.TCP, Ports: ports(port1(443), ruleset.PortRange{Lo: 8000, Hi: 8100}), Source: src(15)},
							{Index: 2, Name: "api.example.com", Proto: ruleset.TCP, Ports: ports(port1(443)), Source: src(18)},
						}},
					},
				}
			},
		},
		{
			file: "testdata/valid/listen.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal:  []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8"), Source: src(3)}},
					AuditRate: DefaultAuditRate,
					Apps: []ruleset.App{
						{Name: "web", Source: src(6), Listen: &ruleset.Listen{Ports: ports(port1(8080), ruleset.PortRange{Lo: 9000, Hi: 9010}), Source: src(7)}},
						{Name: "agent", Source: src(9), Listen: &ruleset.Listen{Ports: ports(port1(0), port1(8443)), Source: src(10)}},
						{Name: "client", Source: src(12), Listen: &ruleset.Listen{Ports: []ruleset.PortRange{}, Source: src(13)}},
					},
				}
			},
		},
		{
			file: "testdata/valid/match.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{
					Internal:  []ruleset.InternalPrefix{{Prefix: pfx("10.0.0.0/8"), Source: src(3)}},
					AuditRate: DefaultAuditRate,
					Apps: []ruleset.App{
						{
							Name: "web", Source: src(5),
							Match:  &ruleset.Match{Kind: ruleset.MatchUnit, Value: "nginx.service", Path: "system.slice/nginx.service"},
							Grants: []ruleset.Grant{{Prefix: pfx("10.1.0.0/16"), Proto: ruleset.Both, Ports: ports(port1(5432)), Source: src(8)}},
						},
						{
							Name: "builds", Source: src(10),
							Match: &ruleset.Match{Kind: ruleset.MatchCgroup, Value: "system.slice/docker-*.scope", Path: "system.slice/docker-*.scope"},
						},
						{Name: "backup", Source: src(13), Match: &ruleset.Match{Kind: ruleset.MatchUser, Value: "root", UID: 0}},
						{Name: "nobody", Source: src(15), Match: &ruleset.Match{Kind: ruleset.MatchUser, Value: "65534", UID: 65534}},
						{
							Name: "getty", Source: src(17),
							Match: &ruleset.Match{Kind: ruleset.MatchUnit, Value: "serial-getty@ttyS0.service",
								Path: `system.slice/system-serial\x2dgetty.slice/serial-getty@ttyS0.service`},
						},
						{
							Name: "nested", Source: src(19),
							Match: &ruleset.Match{Kind: ruleset.MatchUnit, Value: "a-b-c.slice", Path: "a.slice/a-b.slice/a-b-c.slice"},
						},
						{Name: "db", Source: src(21), Match: &ruleset.Match{Kind: ruleset.MatchContainer, Value: "postgres"}},
					},
				}
			},
		},
		{
			file: "testdata/valid/empty-internal.yaml",
			want: func(src func(int) ruleset.Source) *ruleset.Ruleset {
				return &ruleset.Ruleset{AuditRate: DefaultAuditRate}
			},
			warns: []string{
				"testdata/valid/empty-internal.yaml:2:11: internal: no prefixes and no interfaces: nothing is internal, so the policy denies nothing",
			},
		},
	}
	for _, tt := range tests {
		t.Run(filepath.Base(tt.file), func(t *testing.T) {
			got, warns, err := Load(tt.file)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			want := tt.want(func(line int) ruleset.Source { return ruleset.Source{File: tt.file, Line: line} })
			if !reflect.DeepEqual(got, want) {
				t.Errorf("ruleset:\n got %+v\nwant %+v", got, want)
			}
			var ws []string
			for _, w := range warns {
				ws = append(ws, w.String())
			}
			if !reflect.DeepEqual(ws, tt.warns) {
				t.Errorf("warnings:\n got %q\nwant %q", ws, tt.warns)
			}
		})
	}
}

// wantErrors reads the "# want: " comments at the end of an invalid example:
// the exact error lines, with FILE standing for the file's path.
func wantErrors(t *testing.T, file string, data []byte) []string {
	t.Helper()
	var want []string
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "# want: "); ok {
			want = append(want, strings.ReplaceAll(rest, "FILE", file))
		}
	}
	if len(want) == 0 {
		t.Fatalf("%s has no \"# want: \" lines", file)
	}
	return want
}

func TestLoadInvalid(t *testing.T) {
	files, err := filepath.Glob("testdata/invalid/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no invalid examples: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			want := wantErrors(t, file, data)
			rs, _, err := Load(file)
			if rs != nil {
				t.Errorf("Load returned a ruleset with the error")
			}
			checkErrors(t, err, want)
		})
	}
}

// checkErrors asserts that err is an *Errors printing exactly want.
func checkErrors(t *testing.T, err error, want []string) {
	t.Helper()
	var errs *Errors
	if !errors.As(err, &errs) {
		t.Fatalf("error %v (%T) is not *Errors", err, err)
	}
	if len(errs.List) != len(want) {
		t.Errorf("got %d errors, want %d", len(errs.List), len(want))
	}
	if got := err.Error(); got != strings.Join(want, "\n") {
		t.Errorf("errors:\n%s\nwant:\n%s", got, strings.Join(want, "\n"))
	}
}

func TestParseErrors(t *testing.T) {
	const head = "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\n"
	tests := []struct {
		name string
		data string
		want []string
	}{
		{"tab indentation", "version: 1\ninternal:\n\tprefixes: []\n",
			[]string{"p.yaml:3: invalid YAML: found character that cannot start any token"}},
		{"mapping value in a scalar", head + "apps:\n  - name: a: b\n",
			[]string{"p.yaml:5: invalid YAML: mapping values are not allowed in this context"}},
		{"bad indentation deep in an app", head + "apps:\n  - name: a\n    allow:\n      - to: 10.0.0.1\n     ports: [1]\n",
			[]string{"p.yaml:8: invalid YAML: did not find expected key"}},
		{"bad indentation far below the start of its mapping", head + "apps:\n" + strings.Repeat("  - name: a\n    allow: []\n", 100) + " x: 1\n",
			[]string{"p.yaml:205: invalid YAML: did not find expected key"}},
		{"unclosed flow list", head + "apps:\n  - name: a\n    users: [alice,\n      bob\n    allow: []\n",
			[]string{"p.yaml:7: invalid YAML: did not find expected ',' or ']'"}},
		{"unclosed quote", head + "apps:\n  - name: 'a\n    allow: []\n",
			[]string{"p.yaml:5: invalid YAML: found unexpected end of stream"}},
		{"empty input", "", []string{`p.yaml: empty policy; want at least "version: 1"`}},
		{"null document", "~\n", []string{"p.yaml:1:1: want a mapping with keys version, internal, audit, everyone, apps, not null"}},
		{"key that is not a name", head + "[a]: 1\n",
			[]string{"p.yaml:4:1: keys must be plain names, not a list"}},
		{"version not an integer", "version: 1.0\ninternal: {}\n",
			[]string{`p.yaml:1:10: version: want an integer, not "1.0"`}},
		{"custom tag", head + "apps:\n  - name: !custom a\n",
			[]string{"p.yaml:5:11: apps[0].name: unsupported YAML tag !custom"}},
		{"name that is a number is text", head + "apps:\n  - name: 2024\n    users: [alice]\n    allow:\n      - to: 10.0.0.0/8\n        ports: [70000-70001]\n",
			[]string{"p.yaml:9:17: apps[0].allow[0].ports[0]: port 70000 out of range 0-65535"}},
		{"huge integer port", head + "apps:\n  - name: a\n    allow:\n      - to: 10.0.0.0/8\n        ports: [99999999999999999999, 0x10000]\n",
			[]string{
				"p.yaml:8:17: apps[0].allow[0].ports[0]: port 99999999999999999999 out of range 0-65535",
				"p.yaml:8:39: apps[0].allow[0].ports[1]: port 0x10000 out of range 0-65535",
			}},
		{"ports not in decimal", head + "apps:\n  - name: a\n    allow:\n      - to: 10.0.0.0/8\n        ports: [0022, 0x16, 0o26, +22, 2_2, 0, 22]\n    inbound:\n      dynamic: {ports: [040000]}\n",
			[]string{
				"p.yaml:8:17: apps[0].allow[0].ports[0]: port 0022 is not decimal: YAML reads a leading 0 as octal (18); write 22",
				"p.yaml:8:23: apps[0].allow[0].ports[1]: port 0x16 is not decimal; write 22",
				"p.yaml:8:29: apps[0].allow[0].ports[2]: port 0o26 is not decimal; write 22",
				"p.yaml:8:35: apps[0].allow[0].ports[3]: port +22 is not decimal; write 22",
				"p.yaml:8:40: apps[0].allow[0].ports[4]: port 2_2 is not decimal; write 22",
				"p.yaml:10:25: apps[0].inbound.dynamic.ports[0]: port 040000 is not decimal: YAML reads a leading 0 as octal (16384); write 40000",
			}},
		{"duplicate field on its own line", head + "apps:\n  - name: a\n    allow:\n      - to: 10.0.0.0/8\n        to: 10.1.0.0/16\n",
			[]string{"p.yaml:8:9: apps[0].allow[0].to: duplicate field (first at line 7)"}},
		{"duplicate field within a one-line item", head + "apps:\n  - name: a\n    allow:\n      - {to: 10.0.0.0/8, ports: [1], to: 10.1.0.0/16}\n",
			[]string{"p.yaml:7:38: apps[0].allow[0].to: duplicate field (first at column 10 of this line)"}},
		{"grant errors and a missing version together", "internal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: a\n    allow:\n      - to: 10.0.0.1/8\n        proto: sctp\n",
			[]string{
				"p.yaml:1:1: version: missing (required)",
				"p.yaml:6:13: apps[0].allow[0].to: host bits set in 10.0.0.1/8; did you mean 10.0.0.0/8?",
				`p.yaml:7:16: apps[0].allow[0].proto: invalid proto "sctp": want tcp, udp or both (omit for both)`,
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, _, err := Parse("p.yaml", []byte(tt.data))
			if rs != nil {
				t.Errorf("Parse returned a ruleset with the error")
			}
			checkErrors(t, err, tt.want)
		})
	}
}

func TestLoadUnreadable(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name, path string
	}{
		{"missing file", filepath.Join(dir, "nope.yaml")},
		{"directory", dir},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, _, err := Load(tt.path)
			if err == nil || rs != nil {
				t.Fatalf("Load(%s) = %v, %v; want an error", tt.path, rs, err)
			}
			if want := "read policy " + tt.path + ": "; !strings.HasPrefix(err.Error(), want) {
				t.Errorf("error %q does not start with %q", err, want)
			}
			var errs *Errors
			if errors.As(err, &errs) {
				t.Errorf("an unreadable file is not a policy mistake, got *Errors")
			}
		})
	}
}

func TestErrorString(t *testing.T) {
	tests := []struct {
		err  Error
		want string
	}{
		{Error{File: "p.yaml", Line: 12, Col: 17, Field: "apps[0].allow[1].ports[2]", Msg: "port 70000 out of range 0-65535"},
			"p.yaml:12:17: apps[0].allow[1].ports[2]: port 70000 out of range 0-65535"},
		{Error{File: "p.yaml", Line: 3, Msg: "invalid YAML: x"}, "p.yaml:3: invalid YAML: x"},
		{Error{File: "p.yaml", Msg: "empty policy"}, "p.yaml: empty policy"},
	}
	for _, tt := range tests {
		if got := tt.err.Error(); got != tt.want {
			t.Errorf("got %q, want %q", got, tt.want)
		}
	}
	errs := &Errors{List: []Error{tests[0].err, tests[1].err}}
	if got, want := errs.Error(), tests[0].want+"\n"+tests[1].want; got != want {
		t.Errorf("Errors.Error() = %q, want %q", got, want)
	}
}

func TestParsePrefix(t *testing.T) {
	tests := []struct {
		in, want, msg string
	}{
		{in: "10.1.2.0/24", want: "10.1.2.0/24"},
		{in: "10.1.2.3", want: "10.1.2.3/32"},
		{in: "fd00::1", want: "fd00::1/128"},
		{in: "::ffff:10.1.2.3", want: "10.1.2.3/32"},
		{in: "::ffff:10.0.0.0/104", want: "10.0.0.0/8"},
		{in: "::ffff:0.0.0.0/96", want: "0.0.0.0/0"},
		// Shorter than /96 reaches beyond the mapped range: stays IPv6.
		{in: "::ffff:0:0/95", msg: "host bits set in ::ffff:0:0/95; did you mean ::fffe:0:0/95?"},
		{in: "::/0", want: "::/0"},
		{in: "10.1.2.3/24", msg: "host bits set in 10.1.2.3/24; did you mean 10.1.2.0/24?"},
		{in: "::ffff:10.1.2.3/120", msg: "host bits set in ::ffff:10.1.2.3/120; did you mean 10.1.2.0/24?"},
		{in: "10.0.0.0/33", msg: `invalid prefix "10.0.0.0/33": want ADDRESS/BITS or an address`},
		{in: "fe80::1%eth0", msg: `invalid address "fe80::1%eth0": zones are not allowed`},
		{in: "", msg: `invalid address "": want ADDRESS/BITS or an address`},
	}
	for _, tt := range tests {
		got, msg := parsePrefix(tt.in)
		if msg != tt.msg {
			t.Errorf("parsePrefix(%q) message %q, want %q", tt.in, msg, tt.msg)
			continue
		}
		if tt.msg == "" {
			if got != pfx(tt.want) || (got.Addr().Is4() != pfx(tt.want).Addr().Is4()) {
				t.Errorf("parsePrefix(%q) = %v, want %v", tt.in, got, tt.want)
			}
		}
	}
}

// TestSandboxWarnings: loopback: deny without outside: deny changes nothing,
// and an everyone grant outside internal prefixes matters only to sandboxes.
func TestSandboxWarnings(t *testing.T) {
	const head = "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\neveryone:\n  allow:\n    - to: 192.0.2.53\n"
	for _, tc := range []struct {
		name, apps string
		want       []string
	}{
		{"no sandbox", "apps:\n  - name: a\n    loopback: deny\n", []string{
			"p.yaml:9:15: apps[0].loopback: loopback: deny has no effect without outside: deny (loopback is external, and external is allowed)",
			"p.yaml:6:11: everyone.allow[0].to: 192.0.2.53/32 is outside every internal prefix, so the grant has no effect (destinations outside are allowed anyway)",
		}},
		{"a sandbox", "apps:\n  - name: a\n    outside: deny\n    loopback: deny\n    allow:\n      - to: 192.0.2.1\n", nil},
		{"a sealed sandbox with a name grant", "apps:\n  - name: a\n    outside: deny\n    loopback: deny\n    allow:\n      - to: db.corp.example\n", []string{
			"p.yaml:10:15: apps[0].loopback: loopback: deny cuts the app's name grants off: its DNS queries go to the daemon's proxy on loopback, which it may not reach; use loopback: allow",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, warns, err := Parse("p.yaml", []byte(head+tc.apps))
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, w := range warns {
				got = append(got, w.String())
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("warnings:\n got %q\nwant %q", got, tc.want)
			}
		})
	}
}

func TestFirstFailing(t *testing.T) {
	tests := []struct {
		name                string
		start, last, answer int
		maxParses           int
	}{
		{"guess on the problem", 900, 1000, 900, 2},
		{"guess two lines past it", 902, 1000, 900, 4},
		{"guess far past it", 1000, 1000, 10, 30},
		{"guess short of it", 100, 1000, 900, 12},
		{"problem on the first line", 3, 1000, 1, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parses := 0
			fails := func(k int) bool { parses++; return k >= tt.answer }
			if got := firstFailing(tt.start, tt.last, fails); got != tt.answer {
				t.Errorf("firstFailing(%d, %d) = %d, want %d", tt.start, tt.last, got, tt.answer)
			}
			if parses > tt.maxParses {
				t.Errorf("%d parses, want at most %d", parses, tt.maxParses)
			}
		})
	}
}

// TestProblemLineOfALargeFile: the line of a syntax error at the end of a
// large policy costs a few parses of the file, not one per halving. Parses
// are counted, not timed: a time flakes under load.
func TestProblemLineOfALargeFile(t *testing.T) {
	const apps = 20000
	var b strings.Builder
	b.WriteString("version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n")
	for i := range apps {
		fmt.Fprintf(&b, "  - name: a%d\n    allow: []\n", i)
	}
	b.WriteString(" x: 1\n")
	data := []byte(b.String())
	wantLine := 4 + 2*apps + 1

	if _, err := decode(data); err == nil {
		t.Fatal("the file parses")
	}
	parses := 0
	decodeHook = func() { parses++ }
	t.Cleanup(func() { decodeHook = nil })
	_, _, err := Parse("p.yaml", data)
	want := fmt.Sprintf("p.yaml:%d: invalid YAML: did not find expected key", wantLine)
	if err == nil || err.Error() != want {
		t.Fatalf("Parse: %v, want %s", err, want)
	}
	// Bisection from the start takes 19 parses here; the walk back 3.
	if parses > 10 {
		t.Errorf("finding the line took %d parses of the file; want a few", parses)
	}
}

// TestGrantsSharePortLists checks that grants whose port lists are equal
// hold one array (a policy of 1,000,000 grants held one each), and that
// each still reads as written.
func TestGrantsSharePortLists(t *testing.T) {
	const data = "version: 1\ninternal:\n  prefixes: [10.0.0.0/8]\napps:\n  - name: a\n    users: [root]\n    allow:\n" +
		"      - {to: 10.0.0.1, ports: [443, 80]}\n" +
		"      - {to: 10.0.0.2, ports: [80, 443]}\n" +
		"      - {to: 10.0.0.3, ports: [80]}\n" +
		"      - {to: 10.0.0.4}\n" +
		"      - {to: 10.0.0.5}\n"
	rs, _, err := Parse("p.yaml", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	gs := rs.Apps[0].Grants
	tests := []struct {
		name  string
		a, b  int
		want  []ruleset.PortRange
		share bool
	}{
		{"same list in another order", 0, 1, []ruleset.PortRange{{Lo: 80, Hi: 80}, {Lo: 443, Hi: 443}}, true},
		{"all ports", 3, 4, []ruleset.PortRange{ruleset.AllPorts}, true},
		{"another list", 0, 2, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := gs[tt.a].Ports, gs[tt.b].Ports
			if tt.want != nil && (!slices.Equal(a, tt.want) || !slices.Equal(b, tt.want)) {
				t.Errorf("ports %v and %v, want %v", a, b, tt.want)
			}
			if got := &a[0] == &b[0]; got != tt.share {
				t.Errorf("grants %d and %d share their ports: %v, want %v", tt.a, tt.b, got, tt.share)
			}
		})
	}
}
