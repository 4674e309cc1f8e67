package pinhole

import (
	"bufio"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func TestParseProcNet(t *testing.T) {
	const table = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0500090A:0015 0A6433C6:C350 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1
   1: 0500090A:0015 0B6433C6:C351 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0015 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4244 1 0000000000000000 100 0 0 10 0
   3: 0000000000000000FFFF00000500090A:0015 0000000000000000FFFF00000C6433C6:C352 01 00000000:00000000 00:00000000 00000000     0        0 4245 1 0000000000000000 20 4 30 10 -1
`
	got := parseProcNet(bufio.NewScanner(strings.NewReader(table)), map[string]bool{"4242": true, "4244": true, "4245": true})
	ap := netip.MustParseAddrPort
	want := [][2]netip.AddrPort{
		{ap("10.9.0.5:21"), ap("198.51.100.10:50000")},
		{ap("10.9.0.5:21"), ap("198.51.100.12:50002")},
	}
	if !slices.Equal(got, want) {
		t.Errorf("parseProcNet = %v, want %v (established rows of the held inodes only)", got, want)
	}
}

// TestProcHolds looks at another process, as the agent does: this test
// binary's main thread may have been left in another network namespace by
// a namespace helper, and /proc/PID/net shows the main thread's.
func TestProcHolds(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("bash (for its /dev/tcp) is not installed")
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	holder := exec.Command("bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/"+port+"; read -r _ <&3")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		c.Close() // ends the holder's read
		holder.Wait()
	}()
	want := [2]netip.AddrPort{c.RemoteAddr().(*net.TCPAddr).AddrPort(), c.LocalAddr().(*net.TCPAddr).AddrPort()}
	if got := procHolds(uint32(holder.Process.Pid)); !slices.Contains(got, want) {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(holder.Process.Pid) + "/net/tcp")
		t.Errorf("procHolds(holder) = %v, lacks %v\n%s", got, want, b)
	}
	if got := procHolds(uint32(os.Getpid())); slices.Contains(got, want) {
		t.Errorf("procHolds(self) = %v holds the holder's socket", got)
	}
}
