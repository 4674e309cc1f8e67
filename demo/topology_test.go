package demo

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/procgate/procgate/internal/nstest"
)

const dialTimeout = 3 * time.Second

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func TestTopology(t *testing.T) {
	nstest.RequireRoot(t)
	start := time.Now()
	topo, err := Up(context.Background(), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	upTook := time.Since(start)
	t.Cleanup(func() { topo.Close() })

	cases := []struct {
		name    string
		from    string
		network string
		to      netip.AddrPort
		// underlay routes the destination via the laptop's underlay, as if the
		// tunnel's route were gone.
		underlay   bool
		wantDev    string     // the laptop's route to the destination, when from the laptop
		wantBanner string     // exact answer, when wantPeer is not set
		wantPeer   netip.Addr // the internal service's view of the source
		wantTunnel bool       // whether it must come out of the gateway's wg0
		wantErr    error
	}{
		{name: "internal tcp v4 through the tunnel", from: topo.Laptop, network: "tcp", to: topo.InternalAddr,
			wantDev: TunnelIface, wantPeer: topo.LaptopTunnelAddr, wantTunnel: true},
		{name: "internal tcp v6 through the tunnel", from: topo.Laptop, network: "tcp", to: topo.InternalAddr6,
			wantDev: TunnelIface, wantPeer: topo.LaptopTunnelAddr6, wantTunnel: true},
		{name: "internal udp v4 echo", from: topo.Laptop, network: "udp", to: topo.InternalUDP,
			wantDev: TunnelIface, wantBanner: udpEchoProbe, wantTunnel: true},
		{name: "internal udp v6 echo", from: topo.Laptop, network: "udp", to: topo.InternalUDP6,
			wantDev: TunnelIface, wantBanner: udpEchoProbe, wantTunnel: true},
		{name: "internet over the underlay", from: topo.Laptop, network: "tcp", to: topo.InternetAddr,
			wantDev: "up0", wantBanner: "internet-web: hello"},
		{name: "internal not from the internet", from: topo.Internet, network: "tcp", to: topo.InternalAddr,
			wantErr: syscall.EHOSTUNREACH},
		{name: "internal not over the laptop's underlay", from: topo.Laptop, network: "tcp", to: topo.InternalAddr,
			underlay: true, wantDev: "up0", wantErr: syscall.EHOSTUNREACH},
	}
	laptopNL := nsHandle(t, topo.Laptop)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.underlay {
				routeViaUnderlay(t, laptopNL, tc.to.Addr())
			}
			if tc.wantDev != "" {
				if dev := routeDev(t, laptopNL, tc.to.Addr()); dev != tc.wantDev {
					t.Errorf("laptop routes %s via %s, want %s", tc.to.Addr(), dev, tc.wantDev)
				}
			}
			// The gateway counts a packet before handing it to its TUN, so
			// an answer from behind the gateway implies the count.
			before := tunnelRxBytes(t, topo)
			banner, err := Dial(tc.from, tc.network, tc.to, dialTimeout)
			switch {
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Dial = %q, %v; want error %v", banner, err, tc.wantErr)
				}
			case err != nil:
				t.Fatal(err)
			case tc.wantPeer.IsValid():
				peer, err := ParseInternalBanner(banner)
				if err != nil {
					t.Fatal(err)
				}
				if peer.Addr() != tc.wantPeer {
					t.Errorf("internal service saw %s, want %s", peer.Addr(), tc.wantPeer)
				}
			case banner != tc.wantBanner:
				t.Errorf("banner %q, want %q", banner, tc.wantBanner)
			}
			if tc.wantTunnel && tunnelRxBytes(t, topo) == before {
				t.Error("the gateway's wg0 received nothing from the laptop")
			}
		})
	}

	t.Run("internal dns answers its name from the laptop", func(t *testing.T) {
		// The resolver's goroutines run on any thread: its socket is made
		// on a thread in the laptop's namespace, never in the caller's.
		r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (c net.Conn, err error) {
			nerr := inNS(topo.Laptop, func() error {
				var d net.Dialer
				c, err = d.DialContext(ctx, "udp", topo.InternalDNS.String())
				return nil
			})
			return c, errors.Join(nerr, err)
		}}
		for _, tc := range []struct {
			name string
			want []netip.Addr
		}{
			{topo.InternalDBName, []netip.Addr{topo.InternalAddr.Addr()}},
			{"nothere.corp.example", nil},
		} {
			ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
			got, err := r.LookupNetIP(ctx, "ip4", tc.name)
			cancel()
			if tc.want == nil {
				var dnsErr *net.DNSError
				if !errors.As(err, &dnsErr) || !dnsErr.IsNotFound {
					t.Errorf("%s: %v, %v; want not found", tc.name, got, err)
				}
				continue
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("%s: %v, %v; want %v", tc.name, got, err, tc.want)
			}
		}
	})

	laptopNL.Close() // a socket in the laptop's namespace, which Close must not find

	for _, path := range []string{topo.Laptop, topo.Gateway, topo.Internal, topo.Internet} {
		t.Run("process in "+filepath.Base(path), func(t *testing.T) {
			cmd := exec.Command("readlink", "/proc/self/ns/net")
			var out strings.Builder
			cmd.Stdout = &out
			if err := StartIn(path, cmd); err != nil {
				t.Fatal(err)
			}
			if err := cmd.Wait(); err != nil {
				t.Fatal(err)
			}
			if got, want := strings.TrimSpace(out.String()), fmt.Sprintf("net:[%d]", nsInode(t, path)); got != want {
				t.Errorf("child's netns %s, want %s", got, want)
			}
		})
	}
	start = time.Now()
	if err := topo.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Up took %v, Close took %v", upTook, time.Since(start))
	if err := topo.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	assertNothingLeft(t)
}

// cancelAfter is a context whose Err turns to Canceled after n calls, to stop
// Up at each of its checkpoints in turn.
type cancelAfter struct {
	context.Context
	n int
}

func (c *cancelAfter) Err() error {
	if c.n == 0 {
		return context.Canceled
	}
	c.n--
	return nil
}

func TestUpCleansUpWhenCanceled(t *testing.T) {
	nstest.RequireRoot(t)
	// Up checks ctx before each of the four namespaces (checks 0-3), after
	// the veths (4), with the tunnel up (5) and with the services running (6).
	for _, checks := range []int{0, 1, 3, 4, 5, 6} {
		t.Run(fmt.Sprintf("after %d checks", checks), func(t *testing.T) {
			topo, err := Up(&cancelAfter{Context: context.Background(), n: checks}, testLogger(t))
			if err == nil {
				topo.Close()
				t.Fatal("Up succeeded with a canceled context")
			}
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("Up: %v, want context.Canceled", err)
			}
			assertNothingLeft(t)
		})
	}
}

func TestCancelClosesTopology(t *testing.T) {
	nstest.RequireRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	topo, err := Up(ctx, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	cancel()
	select {
	case <-topo.done:
	case <-time.After(10 * time.Second):
		t.Fatal("topology still up 10 s after its context was canceled")
	}
	assertNothingLeft(t)
}

func TestDialRejectsUnknownNetwork(t *testing.T) {
	_, err := Dial("/nonexistent", "sctp", netip.MustParseAddrPort("127.0.0.1:1"), time.Second)
	if err == nil || !strings.Contains(err.Error(), "unsupported network") {
		t.Fatalf("Dial sctp: %v, want unsupported network", err)
	}
}

func TestParseInternalBanner(t *testing.T) {
	cases := []struct {
		line    string
		want    netip.AddrPort
		wantErr bool
	}{
		{line: internalBanner(netip.MustParseAddrPort("100.64.0.2:40000")), want: netip.MustParseAddrPort("100.64.0.2:40000")},
		{line: "internal-db: hello [fd64::2]:1", want: netip.MustParseAddrPort("[fd64::2]:1")},
		{line: "internet-web: hello", wantErr: true},
		{line: "internal-db: hello nobody", wantErr: true},
	}
	for _, tc := range cases {
		got, err := ParseInternalBanner(tc.line)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("ParseInternalBanner(%q) = %v, %v; want %v, error %v", tc.line, got, err, tc.want, tc.wantErr)
		}
	}
}

// tunnelRxBytes is what the gateway's WireGuard device has received from
// the laptop.
func tunnelRxBytes(t *testing.T, topo *Topology) uint64 {
	t.Helper()
	state, err := topo.gatewayWG.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(state, "\n") {
		if v, ok := strings.CutPrefix(line, "rx_bytes="); ok {
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				t.Fatalf("wireguard rx_bytes %q: %v", v, err)
			}
			return n
		}
	}
	t.Fatalf("no rx_bytes in wireguard state:\n%s", state)
	return 0
}

// nsHandle is a netlink handle in the namespace at path, closed when the
// test ends.
func nsHandle(t *testing.T, path string) *netlink.Handle {
	t.Helper()
	var h *netlink.Handle
	err := inNS(path, func() error {
		var err error
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

func routeDev(t *testing.T, h *netlink.Handle, dst netip.Addr) string {
	t.Helper()
	routes, err := h.RouteGet(dst.AsSlice())
	if err != nil || len(routes) == 0 {
		t.Fatalf("route to %s: %v", dst, err)
	}
	link, err := h.LinkByIndex(routes[0].LinkIndex)
	if err != nil {
		t.Fatal(err)
	}
	return link.Attrs().Name
}

// routeViaUnderlay sends dst from the laptop (h) to the gateway's underlay
// address instead of into the tunnel, until the test ends.
func routeViaUnderlay(t *testing.T, h *netlink.Handle, dst netip.Addr) {
	t.Helper()
	link, err := h.LinkByName("up0")
	if err != nil {
		t.Fatal(err)
	}
	r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(netip.PrefixFrom(dst, dst.BitLen())), Gw: gatewayUnderlay.AsSlice()}
	if err := h.RouteAdd(r); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := h.RouteDel(r); err != nil {
			t.Errorf("remove underlay route: %v", err)
		}
	})
}

// assertNothingLeft checks that no topology of this process left a
// namespace file, a mount, a thread in a namespace, a socket in one, or a
// TUN device.
func assertNothingLeft(t *testing.T) {
	t.Helper()
	for _, leftover := range leftovers(t) {
		t.Error("left behind: " + leftover)
	}
}

func leftovers(t *testing.T) []string {
	t.Helper()
	var found []string
	ours := fmt.Sprintf("%d-", os.Getpid())
	entries, err := os.ReadDir(BaseDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ours) {
			found = append(found, filepath.Join(BaseDir, e.Name()))
		}
	}

	mountinfo, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer mountinfo.Close()
	sc := bufio.NewScanner(mountinfo)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 && strings.HasPrefix(fields[4], filepath.Join(BaseDir, ours)) {
			found = append(found, "mount "+fields[4])
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}

	home := nsInode(t, "/proc/self/ns/net")
	tasks, err := filepath.Glob("/proc/self/task/*/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		if ino := nsInode(t, task); ino != home {
			found = append(found, fmt.Sprintf("%s in netns %d", task, ino))
		}
	}

	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err != nil {
			continue // closed meanwhile (the ReadDir's own fd)
		}
		if target == "/dev/net/tun" {
			found = append(found, "TUN fd "+e.Name())
			continue
		}
		if !strings.HasPrefix(target, "socket:") {
			continue
		}
		fd, _ := strconv.Atoi(e.Name())
		nsfd, err := unix.IoctlRetInt(fd, unix.SIOCGSKNS)
		if err != nil {
			continue
		}
		var st unix.Stat_t
		err = unix.Fstat(nsfd, &st)
		unix.Close(nsfd)
		if err == nil && st.Ino != home {
			found = append(found, fmt.Sprintf("fd %s (%s) in netns %d", e.Name(), target, st.Ino))
		}
	}
	return found
}

func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}
