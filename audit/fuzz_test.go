package audit

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/procgate/procgate/bpf"
	"github.com/procgate/procgate/ruleset"
)

// FuzzDecodeEvent feeds arbitrary bytes through the path Run takes from a
// ring buffer sample to a logged record: the bytes come from a map any root
// process can write to.
func FuzzDecodeEvent(f *testing.F) {
	v6 := denyV4()
	v6.Family, v6.AppID, v6.Allowed = 6, 1, 1
	for _, seed := range [][]byte{
		denyV4().encode(f),
		v6.encode(f),
		append(denyV4().encode(f), 1, 2, 3),
		denyV4().encode(f)[:bpf.EventSize-1],
		[]byte(strings.Repeat("\xff", bpf.EventSize)),
		nil,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var clock wallClock
		if err := clock.refresh(); err != nil {
			t.Fatal(err)
		}
		r, err := recordOf(raw, &clock, testAnnotate)
		if err != nil {
			return
		}
		switch r.Verdict {
		case ruleset.VerdictAllow, ruleset.VerdictDeny, ruleset.VerdictWouldDeny:
		default:
			t.Errorf("verdict %q", r.Verdict)
		}
		if strings.Contains(r.Text(), "\n") {
			t.Errorf("Text() spans lines: %q", r.Text())
		}
		line, err := json.Marshal(r)
		if err != nil {
			t.Fatalf("marshal %+v: %v", r, err)
		}
		var back Record
		if err := json.Unmarshal(line, &back); err != nil {
			t.Fatalf("unmarshal %s: %v", line, err)
		}
		if !reflect.DeepEqual(back, r) {
			t.Errorf("log round trip changed the record:\n got %+v\nwant %+v", back, r)
		}
	})
}
