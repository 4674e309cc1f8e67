package perimeter

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
)

// Failover is a client of several gateways of one site, for an agent: it
// speaks to one of them at a time and, when that one cannot be reached
// (connection refused or timed out, TLS failure: anything but an answer),
// tries the next ones in turn within the same call, and stays with the
// first that answers. Every call of the API is safe to repeat on another
// gateway: open renews a hole the delegate holds, close and sync are
// idempotent.
type Failover struct {
	clients []*Client
	log     *slog.Logger

	mu  sync.Mutex
	cur int
	// switched is set when a call moved to another gateway, until
	// Switched reads it.
	switched bool
}

// NewFailover is a client of the gateways at urls, in order of preference,
// that authenticates with the certificate in tlsConf.
func NewFailover(urls []string, tlsConf *tls.Config, log *slog.Logger) (*Failover, error) {
	if len(urls) == 0 {
		return nil, errors.New("failover: no gateway URL")
	}
	f := &Failover{log: cmp.Or(log, slog.Default())}
	for _, u := range urls {
		f.clients = append(f.clients, NewClient(u, tlsConf))
	}
	return f, nil
}

// Clients are the gateways' clients, in order (tests reach their
// transports through them).
func (f *Failover) Clients() []*Client { return f.clients }

// Current is the URL of the gateway the calls go to now.
func (f *Failover) Current() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.clients[f.cur].URL
}

// Switched reports whether a call moved to another gateway since the last
// time it was asked: the agent then syncs all its holes to the new one.
func (f *Failover) Switched() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.switched
	f.switched = false
	return s
}

// unreachable reports whether err means the gateway did not answer: an
// answer, even an error, means it is alive and would answer the same on
// another gateway of the site.
func unreachable(err error) bool {
	var apiErr *APIError
	return err != nil && !errors.As(err, &apiErr)
}

// do runs call against the current gateway, then the next ones while they
// cannot be reached.
func (f *Failover) do(ctx context.Context, call func(*Client) error) error {
	f.mu.Lock()
	start := f.cur
	f.mu.Unlock()
	var errs []error
	for i := range f.clients {
		n := (start + i) % len(f.clients)
		err := call(f.clients[n])
		if !unreachable(err) {
			if n != start {
				f.mu.Lock()
				f.cur, f.switched = n, true
				f.mu.Unlock()
				f.log.Warn("pinhole gateway changed", "from", f.clients[start].URL, "to", f.clients[n].URL)
			}
			return err
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	if len(errs) == 1 {
		return errs[0]
	}
	return fmt.Errorf("no gateway answered: %w", errors.Join(errs...))
}

// Open asks for a hole.
func (f *Failover) Open(ctx context.Context, req Request) (h Hole, err error) {
	err = f.do(ctx, func(c *Client) error { h, err = c.Open(ctx, req); return err })
	return h, err
}

// Renew extends the leases of holes.
func (f *Failover) Renew(ctx context.Context, holes []Target, leaseSeconds int) (r RenewResult, err error) {
	err = f.do(ctx, func(c *Client) error { r, err = c.Renew(ctx, holes, leaseSeconds); return err })
	return r, err
}

// Close closes holes.
func (f *Failover) Close(ctx context.Context, holes []Target) (r CloseResult, err error) {
	err = f.do(ctx, func(c *Client) error { r, err = c.Close(ctx, holes); return err })
	return r, err
}

// List returns the delegate's open holes.
func (f *Failover) List(ctx context.Context) (hs []Hole, err error) {
	err = f.do(ctx, func(c *Client) error { hs, err = c.List(ctx); return err })
	return hs, err
}

// Sync makes the delegate's holes exactly holes.
func (f *Failover) Sync(ctx context.Context, holes []Request) (r SyncResult, err error) {
	err = f.do(ctx, func(c *Client) error { r, err = c.Sync(ctx, holes); return err })
	return r, err
}
