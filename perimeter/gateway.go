package perimeter

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// GatewayConfig is what `procgate gateway` runs with.
type GatewayConfig struct {
	RulesPath string
	// Listen is the API's address (host:port); Listener, if set, is used
	// instead (a socket made in another network namespace, in tests).
	Listen   string
	Listener net.Listener
	Protect  []netip.Prefix
	// TLS is the server side of the mTLS (pki.ServerConfig).
	TLS   *tls.Config
	Lease time.Duration
	// Table and NetNS are as in TableConfig.
	Table string
	NetNS string
	// Reconcile is how often the table is compared with the holes the
	// gateway holds and repaired; DefaultReconcile if zero.
	Reconcile time.Duration
	// MetricsAddr, if set, serves Prometheus /metrics there (plain HTTP).
	MetricsAddr string
	// Etcd, if set, is the site's shared store of holes (HolesPrefix):
	// the gateway writes its agents' holes there and programs its table
	// from every gateway's. The caller closes it after Close.
	Etcd *clientv3.Client
	// RulesFromEtcd reads the rules from RulesKey in Etcd instead of
	// RulesPath, and follows their changes.
	RulesFromEtcd bool
	Log           *slog.Logger
}

// DefaultReconcile is how often a gateway repairs its table by default:
// an administrator's edit or a deleted table lasts at most this long.
const DefaultReconcile = 10 * time.Second

// Gateway is a running perimeter controller: table, controller, API.
type Gateway struct {
	rulesPath string
	etcd      *clientv3.Client
	log       *slog.Logger
	table     *Table
	ctrl      *Controller
	srv       *http.Server
	metrics   *http.Server
	ln        net.Listener
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	serveErr  error
}

// sweepEvery is how often the controller forgets expired holes; the kernel
// closes them by their timeouts on its own, so this only bounds how long a
// listing may show a hole that is already closed.
const sweepEvery = time.Second

// StartGateway loads the rules, installs (or adopts) the table, and serves
// the API until Close.
func StartGateway(cfg GatewayConfig) (*Gateway, error) {
	if cfg.TLS == nil {
		return nil, errors.New("gateway: a TLS configuration is required (mTLS only)")
	}
	log := cmp.Or(cfg.Log, slog.Default())
	var rules *Rules
	var rulesRev int64
	var err error
	if cfg.RulesFromEtcd {
		if cfg.Etcd == nil {
			return nil, fmt.Errorf("gateway: rules from etcd need an etcd client (--etcd-endpoints)")
		}
		rules, rulesRev, err = loadEtcdRules(cfg.Etcd)
	} else {
		rules, err = LoadRules(cfg.RulesPath)
	}
	if err != nil {
		return nil, err
	}
	table, err := OpenTable(TableConfig{Name: cfg.Table, NetNS: cfg.NetNS, Protect: cfg.Protect, Services: rules.Services})
	if err != nil {
		return nil, err
	}
	ctrl, err := NewController(ControllerConfig{Rules: rules, Table: table, Protect: cfg.Protect, Lease: cfg.Lease, Log: log})
	if err != nil {
		table.Close()
		return nil, err
	}
	var store *HoleStore
	var rev int64
	if cfg.Etcd != nil {
		// Before the API answers: a gateway that comes back holds exactly
		// the site's holes, each with what is left of its lease.
		store = NewHoleStore(cfg.Etcd, log)
		holes, r, err := store.List()
		if err == nil {
			err = ctrl.Replace(holes)
		}
		if err != nil {
			log.Error("holes from etcd not applied at start; trying again", "error", err.Error())
		} else {
			rev = r
		}
		ctrl.SetStore(store)
	}
	ln := cfg.Listener
	if ln == nil {
		if ln, err = net.Listen("tcp", cfg.Listen); err != nil {
			table.Close()
			return nil, fmt.Errorf("gateway: listen on %s: %w", cfg.Listen, err)
		}
	}
	if cfg.RulesFromEtcd {
		cfg.RulesPath = rulesName
	}
	g := &Gateway{rulesPath: cfg.RulesPath, log: log, table: table, ctrl: ctrl, ln: ln}
	g.srv = &http.Server{
		Handler:           (&Server{C: ctrl, Log: log}).Handler(),
		TLSConfig:         cfg.TLS,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	ctx, cancel := context.WithCancel(context.Background())
	g.cancel = cancel
	if cfg.MetricsAddr != "" {
		if err := g.serveMetrics(cfg.MetricsAddr); err != nil {
			ln.Close()
			table.Close()
			cancel()
			return nil, err
		}
	}
	reconcile := cmp.Or(cfg.Reconcile, DefaultReconcile)
	if cfg.RulesFromEtcd {
		g.etcd = cfg.Etcd
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			followRules(ctx, cfg.Etcd, rulesRev, ctrl.SetRules, log)
		}()
	}
	if store != nil {
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			store.Follow(ctx, ctrl, rev)
		}()
	}
	g.wg.Add(3)
	go func() {
		defer g.wg.Done()
		if err := g.srv.ServeTLS(ln, "", ""); !errors.Is(err, http.ErrServerClosed) {
			g.serveErr = err
			log.Error("gateway API stopped", "error", err)
		}
	}()
	go func() {
		defer g.wg.Done()
		ctrl.Run(ctx, sweepEvery)
	}()
	go func() {
		defer g.wg.Done()
		ctrl.RunRepair(ctx, reconcile)
	}()
	log.Info("gateway started", "listen", ln.Addr().String(), "rules", cfg.RulesPath, "rule_count", len(rules.List),
		"service_count", len(rules.Services),
		"protect", fmt.Sprint(cfg.Protect), "table", cmp.Or(cfg.Table, DefaultTableName), "lease", cmp.Or(cfg.Lease, DefaultLease), "reconcile", reconcile, "shared_store", store != nil)
	return g, nil
}

// Addr is where the API listens.
func (g *Gateway) Addr() net.Addr { return g.ln.Addr() }

// Controller is the gateway's controller.
func (g *Gateway) Controller() *Controller { return g.ctrl }

// Table is the gateway's nftables table.
func (g *Gateway) Table() *Table { return g.table }

// Reload reads the rules file again. A file with errors is refused whole
// and the rules in force stay.
func (g *Gateway) Reload() error {
	var rules *Rules
	var err error
	if g.etcd != nil {
		rules, _, err = loadEtcdRules(g.etcd)
	} else {
		rules, err = LoadRules(g.rulesPath)
	}
	if err == nil {
		err = g.ctrl.SetRules(rules)
	}
	if err != nil {
		g.log.Error("rules not reloaded; the old rules stay in force", "rules", g.rulesPath, "error", err.Error())
		return err
	}
	g.log.Info("rules reloaded", "rules", g.rulesPath, "rule_count", len(rules.List), "service_count", len(rules.Services))
	return nil
}

// Close stops the API and the sweeper. The table and its holes stay in the
// kernel: a restarted gateway adopts them, and their leases close them if
// none does.
func (g *Gateway) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := g.srv.Shutdown(ctx)
	if g.metrics != nil {
		err = errors.Join(err, g.metrics.Shutdown(ctx))
	}
	g.cancel()
	g.wg.Wait()
	return errors.Join(err, g.serveErr, g.table.Close())
}

func (g *Gateway) serveMetrics(addr string) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(Metrics{g.ctrl})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("gateway: listen for metrics on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	g.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go g.metrics.Serve(ln)
	g.log.Info("serving metrics", "addr", ln.Addr().String())
	return nil
}
