package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Results of a technique, as the target saw it.
const (
	Reached     = "reached"     // the target saw the technique's packet at an internal address
	Blocked     = "blocked"     // it did not
	Unavailable = "unavailable" // this kernel or setup has no such path
)

// attempt is what one technique's process reports: how far its syscalls got.
// Whether anything arrived is for the target to say.
type attempt struct {
	Dest        string `json:"dest,omitempty"`  // what it aimed at
	Stage       string `json:"stage,omitempty"` // the step that failed, if one did
	Errno       string `json:"errno,omitempty"`
	Detail      string `json:"detail,omitempty"`
	Unavailable bool   `json:"unavailable,omitempty"`
	// Flows are the connections of TCP attempts, so that a SYN that arrived
	// without the token (the connection never completed) is still matched.
	Flows []flow `json:"flows,omitempty"`
}

// flow is one TCP connection an attempt made or tried: a SYN belongs to it
// only if its 4-tuple matches. The source port alone does not name a
// connection: the kernel hands the same ephemeral port to connect()s
// towards different destinations at once (it keeps only 4-tuples unique),
// so a SYN of the holder or of another technique may carry the port an
// attempt had towards an address no packet of it ever left for
// (tcp6-unspecified-:: connects to ::1). A failed connect leaves its socket
// without a local address (the port stays): then the source address is
// unknown and the destination and both ports decide. Another socket with the
// same destination, destination port and source port cannot exist while the
// attempt's does (same source address: the 4-tuple would repeat), and after
// it only once the kernel's ports for that tuple have gone round the
// ephemeral range (__inet_hash_connect advances them per tuple).
type flow struct {
	Src netip.AddrPort `json:"src"` // address unspecified when the kernel no longer says
	Dst netip.AddrPort `json:"dst"` // the peer, or where the attempt aimed
}

func (f flow) String() string { return f.Src.String() + ">" + f.Dst.String() }

// carries reports whether rec is this flow's SYN.
func (f flow) carries(rec record) bool {
	if !rec.SYN || rec.Proto != "tcp" || rec.Sport != f.Src.Port() {
		return false
	}
	if src := f.Src.Addr(); !src.IsUnspecified() && rec.Src.Unmap() != src {
		return false
	}
	return rec.Dst.Unmap() == f.Dst.Addr() && rec.Dport == f.Dst.Port()
}

// synOf reports whether rec is the SYN of one of flows.
func synOf(flows []flow, rec record) bool {
	return rec.Token == "" && slices.ContainsFunc(flows, func(f flow) bool { return f.carries(rec) })
}

// describe is the syscall-level story of an attempt.
func (a attempt) describe() string {
	var parts []string
	if a.Stage != "" {
		s := a.Stage
		if a.Errno != "" {
			s += ": " + a.Errno
		}
		parts = append(parts, s)
	} else {
		parts = append(parts, "syscalls succeeded")
	}
	if a.Detail != "" {
		parts = append(parts, a.Detail)
	}
	return strings.Join(parts, "; ")
}

// result is one output line.
type result struct {
	Technique string `json:"technique"`
	Class     string `json:"class"`
	Result    string `json:"result"`
	Detail    string `json:"detail"`
	Role      string `json:"role"`
	Dest      string `json:"dest,omitempty"`
	Seen      string `json:"seen,omitempty"` // where the target saw it
	Flows     []flow `json:"flows,omitempty"`
}

// summary is the last output line.
type summary struct {
	Summary     bool     `json:"summary"`
	Role        string   `json:"role"`
	Nonce       string   `json:"nonce"`
	Total       int      `json:"total"`
	Reached     int      `json:"reached"`
	Blocked     int      `json:"blocked"`
	Unavailable int      `json:"unavailable"`
	ReachedList []string `json:"reached_techniques"`
}

// tokenFor is the token of a technique in this run.
func tokenFor(cfg *config, name string) string {
	return tokenPrefix + cfg.nonce + "/" + cfg.role + "/" + name + "|"
}

// parseToken splits a token into nonce, role and technique.
func parseToken(tok string) (nonce, role, technique string, ok bool) {
	rest, found := strings.CutPrefix(tok, tokenPrefix)
	if !found || !strings.HasSuffix(rest, "|") {
		return "", "", "", false
	}
	f := strings.SplitN(strings.TrimSuffix(rest, "|"), "/", 3)
	if len(f) != 3 {
		return "", "", "", false
	}
	return f[0], f[1], f[2], true
}

// childLimit bounds one technique's process; the slowest (ptrace injection
// waiting on a dropped SYN) needs a few connection timeouts.
const childLimit = 30 * time.Second

// runAll runs every technique in a child process of its own (so that one
// that moves its process to another cgroup, unshares namespaces or crashes
// leaves the others untouched), then asks the target what arrived and writes
// the results.
func runAll(cfg *config, out io.Writer) error {
	if cfg.oracle == "" {
		return errors.New("run needs -oracle: without the target's word nothing can be called reached")
	}
	if cfg.nonce == "" {
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		cfg.nonce = hex.EncodeToString(b)
	}
	o, err := dialOracle(cfg.oracle)
	if err != nil {
		return err
	}
	defer o.Close()
	mark, err := o.mark()
	if err != nil {
		return err
	}
	var ran []*technique
	var attempts []attempt
	for i := range techniques {
		t := &techniques[i]
		if cfg.only != nil && !cfg.only.MatchString(t.name) {
			continue
		}
		ran = append(ran, t)
		attempts = append(attempts, spawnOne(cfg, t.name, 1, nil))
	}
	if err := sendMarker(cfg, o); err != nil {
		return err
	}
	recs, err := o.dump(mark)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(out)
	sum := summary{Summary: true, Role: cfg.role, Nonce: cfg.nonce}
	for i, t := range ran {
		r := judge(cfg, t, attempts[i], recs)
		switch r.Result {
		case Reached:
			sum.Reached++
			sum.ReachedList = append(sum.ReachedList, t.name)
		case Blocked:
			sum.Blocked++
		case Unavailable:
			sum.Unavailable++
		}
		sum.Total++
		if err := enc.Encode(r); err != nil {
			return err
		}
	}
	return enc.Encode(sum)
}

// sendMarker sends a datagram to the external control address, which no
// hook stops, and waits until the target has seen it: attempts made before
// it have had their chance to arrive.
func sendMarker(cfg *config, o *oracle) error {
	tok := tokenFor(cfg, "marker")
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("marker: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Sendto(fd, []byte(tok), 0, sockaddr(cfg.external4, cfg.udpPort, 0)); err != nil {
		return fmt.Errorf("marker to %s: %w", cfg.external4, err)
	}
	ok, err := o.wait(tok, 5*time.Second)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("the target did not see the marker sent to %s:%d/udp: is it running, and routed?", cfg.external4, cfg.udpPort)
	}
	// Packets sent from another CPU may be queued behind the marker for a
	// moment; this is a settling pause, no verdict depends on its length
	// (the test reads the target's records again afterwards).
	time.Sleep(100 * time.Millisecond)
	return nil
}

// judge turns an attempt and the target's records into a result.
func judge(cfg *config, t *technique, a attempt, recs []record) result {
	r := result{Technique: t.name, Class: t.class, Role: cfg.role, Dest: a.Dest, Flows: a.Flows}
	if t.class == classListen {
		// A bind reaches no target: the attacker sees whether it went
		// through, and the test checks that against the policy.
		switch {
		case a.Unavailable:
			r.Result = Unavailable
		case a.Stage == "":
			r.Result, r.Seen = Reached, "bound here"
		default:
			r.Result = Blocked
		}
		r.Detail = a.describe()
		return r
	}
	tok := tokenFor(cfg, t.name)
	var elsewhere []string
	for _, rec := range recs {
		mine := rec.Token == tok || synOf(a.Flows, rec)
		if !mine {
			continue
		}
		if t.class == classControl || inPrefixes(rec.Dst, cfg.internal) {
			r.Result, r.Seen = Reached, rec.String()
			r.Detail = a.describe()
			return r
		}
		if s := rec.String(); !slices.Contains(elsewhere, s) {
			elsewhere = append(elsewhere, s)
		}
	}
	switch {
	case len(elsewhere) > 0:
		r.Result = Blocked
		r.Detail = fmt.Sprintf("arrived only at %s, outside the internal prefixes; %s", strings.Join(elsewhere, ", "), a.describe())
	case a.Unavailable:
		r.Result, r.Detail = Unavailable, a.describe()
	default:
		r.Result, r.Detail = Blocked, a.describe()
	}
	return r
}

func inPrefixes(a netip.Addr, ps []netip.Prefix) bool {
	a = a.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// spawnOne runs `attack one` for a technique in a child process and returns
// its attempt. attr, if set, places the child (another cgroup, namespaces).
func spawnOne(cfg *config, name string, stage int, attr *syscall.SysProcAttr) attempt {
	ctx, cancel := context.WithTimeout(context.Background(), childLimit)
	defer cancel()
	args := append([]string{"one"}, cfg.args...)
	args = append(args, "-technique", name, "-nonce", cfg.nonce, "-stage", fmt.Sprint(stage))
	cmd := exec.CommandContext(ctx, "/proc/self/exe", args...)
	cmd.SysProcAttr = attr
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		return attempt{}.failed("spawn", err)
	}
	err := cmd.Wait()
	var a attempt
	if jerr := json.Unmarshal(stdout.Bytes(), &a); jerr != nil {
		a = attempt{Stage: fmt.Sprintf("process (stage %d)", stage), Errno: errnoName(err)}
		if err == nil {
			a.Errno = "bad output: " + jerr.Error()
		}
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			a.Detail = lastLine(msg)
		}
	}
	return a
}

func lastLine(s string) string {
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// runOne runs one technique in this process and writes its attempt.
func runOne(cfg *config, out io.Writer) error {
	t := findTechnique(cfg.technique)
	if t == nil {
		return fmt.Errorf("no technique %q (attack list shows them)", cfg.technique)
	}
	if cfg.nonce == "" {
		return errors.New("one needs -nonce")
	}
	e := &env{cfg: cfg, tech: t, token: []byte(tokenFor(cfg, t.name))}
	a := t.try(e)
	return json.NewEncoder(out).Encode(a)
}

func findTechnique(name string) *technique {
	for i := range techniques {
		if techniques[i].name == name {
			return &techniques[i]
		}
	}
	return nil
}

// serveTarget runs the target until SIGINT or SIGTERM.
func serveTarget(cfg *config) error {
	if cfg.listen == "" {
		return errors.New("target needs -listen SOCKET for the oracle")
	}
	tc := targetConfig{Ifname: cfg.ifname, TCPPort: cfg.tcpPort, UDPPort: cfg.udpPort, Oracle: cfg.listen}
	if cfg.log != "" {
		f, err := os.OpenFile(cfg.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		tc.Log = f
	}
	t, err := startTarget(tc)
	if err != nil {
		return err
	}
	defer t.Close()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	return nil
}
