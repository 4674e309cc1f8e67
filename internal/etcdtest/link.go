package etcdtest

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// Link is one host's way to etcd: a TCP proxy on 127.0.0.1 for each
// member. Cut drops every connection and refuses new ones, as a network
// partition of that host would (to etcd's clients an unreachable member
// and a refused one are both away); Restore brings the link back on the
// same addresses.
type Link struct {
	proxies []*proxy
}

// Listen makes a link's listening socket: net.Listen, or one made inside
// a test network namespace so that a daemon there reaches etcd through
// the link (its dials to etcd stay in the test process's namespace, on
// 127.0.0.1).
type Listen func(addr string) (net.Listener, error)

// Link makes a link to every member, closed at the end of the test.
func (c *Cluster) Link(t testing.TB) *Link {
	t.Helper()
	return NewLink(t, c.Endpoints(), nil)
}

// NewLink makes a link to the members at endpoints (plain http), its
// sockets made by listen (nil: net.Listen), closed at the end of the test.
func NewLink(t testing.TB, endpoints []string, listen Listen) *Link {
	t.Helper()
	if listen == nil {
		listen = func(addr string) (net.Listener, error) { return net.Listen("tcp", addr) }
	}
	l := &Link{}
	t.Cleanup(l.Close)
	for _, e := range endpoints {
		p, err := newProxy(strings.TrimPrefix(e, "http://"), listen)
		if err != nil {
			t.Fatal(err)
		}
		l.proxies = append(l.proxies, p)
	}
	return l
}

// Endpoints are the link's client URLs: give them to the host's etcd
// client instead of the members'.
func (l *Link) Endpoints() []string {
	var out []string
	for _, p := range l.proxies {
		out = append(out, "http://"+p.addr)
	}
	return out
}

// Cut partitions the host from the cluster.
func (l *Link) Cut() {
	for _, p := range l.proxies {
		p.cut()
	}
}

// Restore ends the partition.
func (l *Link) Restore() error {
	for _, p := range l.proxies {
		if err := p.restore(); err != nil {
			return err
		}
	}
	return nil
}

// Close cuts the link for good.
func (l *Link) Close() { l.Cut() }

type proxy struct {
	addr, target string
	listen       Listen
	mu           sync.Mutex
	ln           net.Listener
	conns        map[net.Conn]bool
}

func newProxy(target string, listen Listen) (*proxy, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	p := &proxy{addr: addr, target: target, listen: listen, conns: map[net.Conn]bool{}}
	return p, p.restore()
}

func (p *proxy) restore() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		return nil
	}
	ln, err := p.listen(p.addr)
	if err != nil {
		return fmt.Errorf("link to %s on %s: %w", p.target, p.addr, err)
	}
	p.ln = ln
	go p.serve(ln)
	return nil
}

func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// track adds c to the connections a cut closes; false when the link was
// cut meanwhile (c is closed).
func (p *proxy) track(ln net.Listener, c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != ln {
		c.Close()
		return false
	}
	p.conns[c] = true
	return true
}

func (p *proxy) untrack(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.conns, c)
	c.Close()
}

func (p *proxy) serve(ln net.Listener) {
	for {
		in, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			time.Sleep(10 * time.Millisecond) // EMFILE and the like: no busy loop
			continue
		}
		go p.pipe(ln, in)
	}
}

func (p *proxy) pipe(ln net.Listener, in net.Conn) {
	if !p.track(ln, in) {
		return
	}
	defer p.untrack(in)
	out, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	if !p.track(ln, out) {
		return
	}
	defer p.untrack(out)
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(out, in); done <- struct{}{} }()
	go func() { _, _ = io.Copy(in, out); done <- struct{}{} }()
	<-done
}
