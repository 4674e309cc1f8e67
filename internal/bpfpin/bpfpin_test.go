package bpfpin

import (
	"errors"
	"strings"
	"testing"
)

type closer struct {
	closed int
	err    error
}

func (c *closer) Close() error { c.closed++; return c.err }

// programs is unexported and embedded, as bpf2go's are.
type programs struct {
	A *closer
	B *closer
}

type objs struct {
	programs
	M      *closer
	Absent *closer
	Links  []*closer
	Count  int
}

func TestClose(t *testing.T) {
	a, b, m, l1, l2 := &closer{}, &closer{err: errors.New("b refused")}, &closer{}, &closer{}, &closer{}
	o := objs{programs: programs{A: a, B: b}, M: m, Links: []*closer{l1, nil, l2}, Count: 3}
	err := Close(&o)
	if err == nil || !strings.Contains(err.Error(), "b refused") {
		t.Errorf("Close = %v, want b's error", err)
	}
	for name, c := range map[string]*closer{"embedded A": a, "embedded B": b, "M": m, "link 1": l1, "link 2": l2} {
		if c.closed != 1 {
			t.Errorf("%s closed %d times, want 1", name, c.closed)
		}
	}
	if o.A != nil || o.B != nil || o.M != nil || o.Links != nil || o.Count != 3 {
		t.Errorf("after Close: %+v; want closers nil, the rest kept", o)
	}
	if err := Close(&o); err != nil || a.closed != 1 {
		t.Errorf("second Close = %v, A closed %d times; want nothing closed again", err, a.closed)
	}
	if err := Close(o); err == nil {
		t.Error("Close of a struct value, not a pointer: no error")
	}
}
