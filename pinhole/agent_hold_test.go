package pinhole

import (
	"context"
	"slices"
	"testing"

	"github.com/procgate/procgate/perimeter"
)

// releasingGuard is a fakeGuard that holds answers as the Kernel does: it
// records each release and the holes the gateway held at that moment.
type releasingGuard struct {
	*fakeGuard
	gw       *fakeGateway
	releases []string
	live     [][]perimeter.Key
}

func (g *releasingGuard) Release(app uint32, n uint64) error {
	g.releases = append(g.releases, itoa(app)+"x"+itoa(uint32(n)))
	g.live = append(g.live, g.gw.keys())
	return nil
}

// TestAgentReleasesHoldsAfterTheGateway: the hold of an app's control
// connections is released once per batch, counting each auxiliary open,
// after the gateway answered, also for a forked session
// or the gateway refused it, so that the app never waits for its deadline.
func TestAgentReleasesHoldsAfterTheGateway(t *testing.T) {
	r := newRig(t)
	g := &releasingGuard{fakeGuard: r.guard, gw: r.gw}
	r.agent.cfg.Guard = g
	r.gw.refuse[mallory] = true
	ctx := context.Background()
	steps := []struct {
		name     string
		batch    []Event
		releases []string
		live     []perimeter.Key // at the release
	}{
		{"a control connection holds nothing", []Event{ctl(1, 100, client)}, nil, nil},
		{"an open is released with its hole live", []Event{aux(10, 100, perimeter.TCP, 40000)}, []string{"3x1"},
			[]perimeter.Key{key(client, perimeter.TCP, 40000)}},
		{"two opens in a batch, one release", []Event{aux(11, 100, perimeter.TCP, 40001), aux(12, 100, perimeter.UDP, 40002)}, []string{"3x2"},
			[]perimeter.Key{key(client, perimeter.TCP, 40000), key(client, perimeter.TCP, 40001), key(client, perimeter.UDP, 40002)}},
		{"an open in a forked session (peers from /proc) is released too", []Event{aux(20, 200, perimeter.TCP, 40003)}, []string{"3x1"}, nil},
		{"a refused hole is released too", []Event{ctl(2, 300, mallory), aux(30, 300, perimeter.TCP, 40004)}, []string{"3x1"},
			[]perimeter.Key{key(client, perimeter.TCP, 40000), key(client, perimeter.TCP, 40001), key(client, perimeter.UDP, 40002), key(client, perimeter.TCP, 40003)}},
	}
	for _, s := range steps {
		g.releases, g.live = nil, nil
		r.agent.apply(ctx, s.batch)
		if !slices.Equal(g.releases, s.releases) {
			t.Errorf("%s: releases %v, want %v", s.name, g.releases, s.releases)
		}
		if s.live != nil && (len(g.live) != 1 || !slices.Equal(g.live[0], s.live)) {
			t.Errorf("%s: the gateway held %v at the release, want %v", s.name, g.live, s.live)
		}
	}
}
