package main

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/procgate/procgate/daemon"
	"github.com/procgate/procgate/internal/ftpsite"
	"github.com/procgate/procgate/internal/nstest"
	"github.com/procgate/procgate/internal/pinholetest"
)

// TestPinholeFailover: the agent knows two gateways of the site. The
// first dies with its router's state; the second router takes over with
// an empty table. The agent moves to it and syncs every hole it needs, so
// that the client's traffic passes again, and new holes open there.
func TestPinholeFailover(t *testing.T) {
	top := nstest.NewSite(t)
	gw := pinholetest.StartGateway(t, top, pinholeRules, time.Minute)
	e := newE2EIn(t, pinholePolicy, top.Server, true,
		"--gateway", gw.URL+","+pinholetest.BackupURL, "--gateway-ca", gw.CA, "--gateway-cert", gw.Cert, "--gateway-key", gw.Key)
	app := pinholetest.Start(t, filepath.Join(e.cgroup, daemon.AppsDir, "xfer"), top.Server)
	app.Do("control 2121")
	ctl, err := nstest.DialIn(top.Client, "tcp", nstest.Server4+":2121", 5*time.Second)
	if err != nil {
		t.Fatalf("control connection: %v", err)
	}
	defer ctl.Close()
	aux := nstest.Server4 + ":40000"
	app.Do("listen 40000")
	until(t, "tcp hole for the client", func() bool { return hasHole(e.pinholes(), "open", "tcp", nstest.Client4, 40000) })
	mustReach(t, top.Client, "tcp", aux, "data\n", "the client through its hole at the first gateway")

	backup := gw.Takeover(t)
	b := backup.Client(t, "srv1", top.Server)
	want := holeKey(nstest.Client4, "tcp", 40000)
	until(t, "the hole at the second gateway", func() bool { return slices.Contains(gatewayHoles(t, b), want) })
	mustReach(t, top.Client, "tcp", aux, "data\n", "the client through its hole at the second gateway")
	mustNotReach(t, top.Other, "tcp", aux, "the second external host at the second gateway")
	if st := e.status(); st.Pinholes == nil || st.Pinholes.Gateway != pinholetest.BackupURL {
		t.Errorf("status after the move: %+v, want the second gateway", st.Pinholes)
	}
	if log := e.daemonLog(); !strings.Contains(log, "pinhole gateway changed") {
		t.Errorf("the daemon did not log the move to the second gateway:\n%s", log)
	}

	app.Do("listen 40001")
	until(t, "a new hole at the second gateway", func() bool {
		return slices.Contains(gatewayHoles(t, b), holeKey(nstest.Client4, "tcp", 40001))
	})
	mustReach(t, top.Client, "tcp", nstest.Server4+":40001", "data\n", "a new hole after the failover")
	if st := e.status(); st.Pinholes == nil || st.Pinholes.Open != 2 {
		t.Errorf("status after the failover: %+v", st.Pinholes)
	}
}

// TestPinholeFTPFailover: vsftpd behind the perimeter, its agent knowing
// two gateways. curl lists through the first; its router dies with its
// table and the second takes over, empty. The next transfer's data hole
// is asked of the first, which does not answer, then of the second: the
// 100 MB download passes with the checksum, and the second router drops
// nothing of it (the kernel held vsftpd's PASV answer until the hole was
// live there).
func TestPinholeFTPFailover(t *testing.T) {
	c := newChainSite(t, "10s", pinholetest.BackupURL)
	site := ftpServer(t, c.perimeterSite, false)
	c.startInApp(t, "ftp", site.Args()...)
	c.waitListen(t, 21)
	ctx := context.Background()
	curl := ftpsite.Curl{NetNS: c.Client}
	url := "ftp://" + nstest.Server4 + "/"
	if _, err := curl.List(ctx, url); err != nil {
		t.Fatalf("list through the first gateway: %v", err)
	}
	c.waitNoAgentHoles(t, "after the listing")

	c.gw = c.gw.Takeover(t)
	c.srv1 = c.client(t, "srv1")
	dropsBefore, err := c.gw.Table().Dropped()
	if err != nil {
		t.Fatal(err)
	}
	tr, err := curl.Get(ctx, url+ftpsite.BigFile)
	if err != nil {
		t.Fatalf("download through the second gateway: %v", err)
	}
	if tr.Bytes != ftpSize || tr.Sum != site.Sum {
		t.Fatalf("downloaded %d bytes with sha256 %s, want %d with %s", tr.Bytes, tr.Sum, ftpSize, site.Sum)
	}
	dropsAfter, err := c.gw.Table().Dropped()
	if err != nil {
		t.Fatal(err)
	}
	if dropsAfter != dropsBefore {
		t.Errorf("the second router dropped %d packets during the download", dropsAfter-dropsBefore)
	}
	if !strings.Contains(c.gw.Log(), `"msg":"pinhole opened"`) {
		t.Errorf("the second gateway opened no hole:\n%s", c.gw.Log())
	}
	t.Logf("100 MB in %v through the second gateway", tr.Took.Round(time.Millisecond))
	c.waitNoAgentHoles(t, "after the download")
}
