package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/perimeter"
)

// kernelHoles is the router's set, as sorted strings.
func (s *perimeterSite) kernelHoles(t *testing.T) []string {
	t.Helper()
	els, err := s.gw.Table().Elements()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range els {
		out = append(out, e.Key.String())
	}
	slices.Sort(out)
	return out
}

// TestPinholeBadInputAppliesNothing sends the gateway, in the router's
// real kernel, requests that are bad in one element among good ones: each
// is refused whole with the field named, and the kernel's set is what it
// was (the unit tests check the same on a fake kernel).
func TestPinholeBadInputAppliesNothing(t *testing.T) {
	s := newPerimeterSite(t, 30*time.Second)
	ctx := context.Background()
	good := func(port int) perimeter.Request {
		return perimeter.Request{User: "alice", Target: perimeter.Target{Proto: "tcp", Peer: nstest.Client4, Host: nstest.Server4, Port: port}}
	}
	for _, p := range []int{40000, 40001} {
		if _, err := s.srv1.Open(ctx, good(p)); err != nil {
			t.Fatal(err)
		}
	}
	before := s.kernelHoles(t)
	if len(before) != 2 {
		t.Fatalf("kernel holds %v, want the two holes", before)
	}
	bad := good(40002)
	bad.Peer = "198.51.100.300"
	outside := good(40003)
	outside.Host = "10.8.0.5"
	mixed := good(40004)
	mixed.Peer = nstest.Client6
	for _, tc := range []struct {
		name  string
		call  func() error
		field string
	}{
		{"sync with a bad peer among good holes", func() error {
			_, err := s.srv1.Sync(ctx, []perimeter.Request{good(40000), good(40005), bad})
			return err
		}, "holes[2].peer"},
		{"sync with a host outside --protect", func() error {
			_, err := s.srv1.Sync(ctx, []perimeter.Request{good(40005), outside})
			return err
		}, "holes[1].host"},
		{"open with peer and host of different families", func() error {
			_, err := s.srv1.Open(ctx, mixed)
			return err
		}, "peer"},
		{"close with a bad port among existing holes", func() error {
			_, err := s.srv1.Close(ctx, []perimeter.Target{good(40000).Target, {Proto: "tcp", Peer: nstest.Client4, Host: nstest.Server4, Port: 70000}})
			return err
		}, "holes[1].port"},
		{"renew with a bad protocol", func() error {
			_, err := s.srv1.Renew(ctx, []perimeter.Target{good(40001).Target, {Proto: "sctp", Peer: nstest.Client4, Host: nstest.Server4, Port: 40001}}, 0)
			return err
		}, "holes[1].proto"},
		{"a body over the size limit", func() error {
			body := `{"holes":[` + strings.Repeat(`{"proto":"tcp","peer":"198.51.100.10","host":"10.9.0.5","port":40000,"user":"alice"},`, 120_000) + `]}`
			resp, err := s.srv1.HTTP.Post(s.gwURL+perimeter.PathSync, "application/json", strings.NewReader(body))
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			apiErr := &perimeter.APIError{Status: resp.StatusCode}
			if err := json.NewDecoder(resp.Body).Decode(apiErr); err != nil {
				return fmt.Errorf("status %d, unreadable answer: %w", resp.StatusCode, err)
			}
			return apiErr
		}, "body"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var apiErr *perimeter.APIError
			if err := tc.call(); !errors.As(err, &apiErr) || apiErr.Status != 400 || apiErr.Field != tc.field {
				t.Fatalf("got %v (%+v), want 400 naming %q", err, apiErr, tc.field)
			}
			if after := s.kernelHoles(t); !slices.Equal(after, before) {
				t.Fatalf("the kernel's set changed: %v → %v", before, after)
			}
		})
	}
	if holes := s.agentHoles(t); len(holes) != 2 {
		t.Errorf("the gateway lists %+v after the refusals, want the two holes", holes)
	}
}
