package api

import (
	"strings"
	"testing"
)

func TestDecodeLine(t *testing.T) {
	for _, tc := range []struct {
		in      string
		wantErr string
	}{
		{`{"op":"status"}`, ""},
		{`{"op":"explain","app":"db","dest":"10.1.2.3:5432"}`, ""},
		{`{"op":"revoke","app":"db","grant":1}`, ""},
		{`{"op":"run","app":"db","argv":["true"]}`, ""},
		{`{}`, "no op"},
		{`{"op":"format-disk"}`, "unknown op"},
		{`{"op":"status","uid":0}`, "unknown field"},
		{`not json`, "decode request"},
		{`{"op":"status"} trailing`, ""}, // one value is read; the rest is ignored
	} {
		_, err := DecodeLine([]byte(tc.in))
		if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("DecodeLine(%s) = %v, want error containing %q", tc.in, err, tc.wantErr)
		}
	}
}

// FuzzDecodeLine: no request, however malformed, may panic the daemon, and
// an accepted one always names a known op.
func FuzzDecodeLine(f *testing.F) {
	for _, s := range []string{`{"op":"status"}`, `{"op":"run","argv":["a"],"env":["X=1"]}`, `{"op":"revoke","grant":-1}`, `{"signal":9}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeLine(b)
		if err != nil {
			return
		}
		switch req.Op {
		case OpStatus, OpExplain, OpRevoke, OpEvents, OpRun, OpAppInfo, OpReload:
		default:
			t.Fatalf("accepted unknown op %q", req.Op)
		}
	})
}
