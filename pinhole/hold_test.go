package pinhole

import (
	"bufio"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/pinholetest"
	"github.com/procgate/procgate/perimeter"
	"github.com/procgate/procgate/ruleset"
)

// TestKernelHoldsTheAnswer: after an auxiliary listen, the app's answer on
// its control connection is held in the kernel (hold_egress counts it)
// until the agent releases the open, and then arrives; without a release
// (a dead agent) it arrives too, once the hold's deadline has passed. The
// read deadlines only bound a hang.
func TestKernelHoldsTheAnswer(t *testing.T) {
	in := &ruleset.Inbound{Control: []ruleset.PortRange{{Lo: 2121, Hi: 2121}}, Ports: []ruleset.PortRange{{Lo: 40000, Hi: 40010}}, Proto: ruleset.TCP}
	r := newKernelRig(t, in, slog.New(slog.NewTextHandler(io.Discard, nil)))
	go func() {
		for {
			if _, err := r.k.Read(); err != nil {
				return
			}
		}
	}()
	srv := pinholetest.Start(t, r.appDir, r.ns)
	srv.Do("control 2121")
	c, err := nstest.DialIn(r.ns, "tcp", "127.0.0.1:2121", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	lines := bufio.NewReader(c)
	readLine := func(want, why string) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := lines.ReadString('\n')
		if err != nil || got != want {
			t.Fatalf("%s: read %q, %v; want %q", why, got, err, want)
		}
	}
	readLine("hello\n", "greeting, before any auxiliary open")
	held := func() uint64 {
		t.Helper()
		n, err := r.k.Held()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}

	for _, tc := range []struct {
		name    string
		port    string
		release bool
	}{
		{"released by the agent", "40001", true},
		{"the agent never answers: the deadline ends the hold", "40002", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := held()
			if n := srv.Do("pasv " + tc.port); n != "1" {
				t.Fatalf("pasv wrote to %s control connections, want 1", n)
			}
			if held() == before {
				t.Fatal("the answer written after the listen was not held")
			}
			if tc.release {
				// The kick walks the TCP sockets of the caller's network
				// namespace, as the daemon's are the apps'.
				if err := nstest.InNS(t, r.ns, func() error { return r.k.Release(r.binding.AppID, 1) }); err != nil {
					t.Fatal(err)
				}
			}
			readLine("227 "+tc.port+"\n", "the held answer")
		})
	}

	// Not held: a connection that is not a control connection, and the
	// control connection once every open is released or past its deadline.
	srv.Do("keep 40003")
	if err := nstest.InNS(t, r.ns, func() error { return r.k.Release(r.binding.AppID, 1) }); err != nil { // the keep's listen
		t.Fatal(err)
	}
	lo := netip.MustParseAddr("127.0.0.1")
	if err := r.k.Allow(perimeter.Key{Peer: lo, Proto: perimeter.TCP, Host: lo, Port: 40003}); err != nil {
		t.Fatal(err)
	}
	d, err := nstest.DialIn(r.ns, "tcp", "127.0.0.1:40003", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	before := held()
	d.SetReadDeadline(time.Now().Add(10 * time.Second))
	if got, err := bufio.NewReader(d).ReadString('\n'); err != nil || got != "data\n" {
		t.Fatalf("auxiliary connection: %q, %v", got, err)
	}
	if n := srv.Do("hangup"); n != "1" {
		t.Fatalf("hangup closed %s control connections, want 1", n)
	}
	if after := held(); after != before {
		t.Errorf("held %d segments of connections that are not control connections or not pending", after-before)
	}
}
