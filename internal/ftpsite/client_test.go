package ftpsite

import (
	"net/netip"
	"testing"
)

func TestParsePasv(t *testing.T) {
	for _, tc := range []struct {
		msg  string
		want string // "" for an error
	}{
		{"Entering Passive Mode (10,9,0,5,156,102).", "10.9.0.5:40038"},
		{"Entering Passive Mode ( 10, 9, 0, 5, 0, 21 )", "10.9.0.5:21"},
		{"Entering Passive Mode (10,9,0,5,156).", ""},
		{"Entering Passive Mode (10,9,0,5,156,256).", ""},
		{"Entering Passive Mode 10,9,0,5,156,102", ""},
		{"Entering Passive Mode )10,9,0,5,156,102(", ""},
	} {
		got, err := ParsePasv(tc.msg)
		if tc.want == "" {
			if err == nil {
				t.Errorf("%q: got %v, want an error", tc.msg, got)
			}
			continue
		}
		if err != nil || got != netip.MustParseAddrPort(tc.want) {
			t.Errorf("%q: got %v, %v; want %s", tc.msg, got, err, tc.want)
		}
	}
}

func TestDataPort(t *testing.T) {
	log := "* Connected to 10.9.0.5 (10.9.0.5) port 21 (#0)\n" +
		"* Connect data stream passively\n" +
		"* Connecting to 10.9.0.5 (10.9.0.5) port 40043\n"
	if got := dataPort(log); got != 40043 {
		t.Errorf("dataPort = %d, want 40043", got)
	}
	if got := dataPort("* Connected to 10.9.0.5 (10.9.0.5) port 21 (#0)\n"); got != 0 {
		t.Errorf("dataPort without a data connection = %d, want 0", got)
	}
}
