package pinhole

import (
	"bufio"
	"encoding/hex"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Written by hand: prometheus/procfs's NetTCP is deprecated by its authors
// (for sock_diag), and sock_diag would mean entering the process's netns.

// procHolds lists the established TCP connections whose sockets process
// tgid holds: the socket inodes of /proc/TGID/fd, looked up in
// /proc/TGID/net/tcp and tcp6 (the process's own network namespace). An
// MPTCP socket's subflows carry other inodes and are not found; such a
// process (Go's servers) is matched by its own control connections anyway.
func procHolds(tgid uint32) [][2]netip.AddrPort {
	dir := "/proc/" + strconv.FormatUint(uint64(tgid), 10)
	fds, err := os.ReadDir(filepath.Join(dir, "fd"))
	if err != nil {
		return nil
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join(dir, "fd", fd.Name()))
		if err == nil && strings.HasPrefix(target, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")] = true
		}
	}
	if len(inodes) == 0 {
		return nil
	}
	var out [][2]netip.AddrPort
	for _, table := range []string{"tcp", "tcp6"} {
		f, err := os.Open(filepath.Join(dir, "net", table))
		if err != nil {
			continue
		}
		out = append(out, parseProcNet(bufio.NewScanner(f), inodes)...)
		f.Close()
	}
	return out
}

// parseProcNet reads the rows of /proc/net/tcp{,6} in state ESTABLISHED
// (01) whose inode is in inodes.
func parseProcNet(sc *bufio.Scanner, inodes map[string]bool) [][2]netip.AddrPort {
	var out [][2]netip.AddrPort
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 10 || f[3] != "01" || !inodes[f[9]] {
			continue
		}
		local, ok1 := parseProcAddr(f[1])
		remote, ok2 := parseProcAddr(f[2])
		if ok1 && ok2 {
			out = append(out, [2]netip.AddrPort{local, remote})
		}
	}
	return out
}

// parseProcAddr reads "0100007F:0015": the address as the kernel's words in
// host (little-endian) order, the port in hex.
func parseProcAddr(s string) (netip.AddrPort, bool) {
	addrHex, portHex, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, false
	}
	raw, err := hex.DecodeString(addrHex)
	port, perr := strconv.ParseUint(portHex, 16, 16)
	if err != nil || perr != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, false
	}
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	var a netip.Addr
	if len(raw) == 4 {
		a = netip.AddrFrom4([4]byte(raw))
	} else {
		a = netip.AddrFrom16([16]byte(raw)).Unmap()
	}
	return netip.AddrPortFrom(a, uint16(port)), true
}
