package daemon

import (
	"slices"
	"strings"
	"testing"
)

func TestGatewayURLs(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
		err  string
	}{
		{in: "https://10.9.0.1:8443", want: []string{"https://10.9.0.1:8443"}},
		{in: "https://10.9.0.1:8443, https://10.9.0.2:8443", want: []string{"https://10.9.0.1:8443", "https://10.9.0.2:8443"}},
		{in: "http://10.9.0.1:8443", err: `item 1 "http://10.9.0.1:8443"`},
		{in: "https://10.9.0.1:8443,", err: `item 2 ""`},
		{in: "10.9.0.1:8443", err: "want https://HOST:PORT"},
	} {
		got, err := gatewayURLs(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: error %v, want one with %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("%q: %v %v, want %v", tc.in, got, err, tc.want)
		}
	}
}
