package fleet

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Config is how to reach etcd: the --etcd-* flags.
type Config struct {
	Endpoints []string
	// CA checks etcd's certificate; Cert and Key are the client's (etcd's
	// --client-cert-auth, and the user of RBAC by its common name).
	CA, Cert, Key string
	// DialTimeout bounds the first connection; 0: 5s.
	DialTimeout time.Duration
}

// SplitEndpoints reads URL,URL.
func SplitEndpoints(s string) []string {
	var out []string
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// Client connects to etcd. The connection is lazy: an etcd that is away
// shows at the first request, not here.
func (c Config) Client() (*clientv3.Client, error) {
	if len(c.Endpoints) == 0 {
		return nil, errors.New("no etcd endpoints: give --etcd-endpoints https://HOST:2379[,...] (or PROCGATE_ETCD_ENDPOINTS)")
	}
	tlsConf, err := c.tls()
	if err != nil {
		return nil, err
	}
	dial := c.DialTimeout
	if dial == 0 {
		dial = 5 * time.Second
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   c.Endpoints,
		TLS:         tlsConf,
		DialTimeout: dial,
		// Keepalives find a dead connection without waiting for a request.
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 3 * time.Second,
		Logger:               zap.NewNop(), // errors come back to us and are logged with slog
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client for %s: %w", strings.Join(c.Endpoints, ","), err)
	}
	return cli, nil
}

func (c Config) tls() (*tls.Config, error) {
	if c.CA == "" && c.Cert == "" && c.Key == "" {
		for _, e := range c.Endpoints {
			if strings.HasPrefix(e, "https://") {
				return nil, fmt.Errorf("etcd endpoint %s is https: give --etcd-ca (and --etcd-cert/--etcd-key when etcd checks clients)", e)
			}
		}
		return nil, nil
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CA != "" {
		pem, err := os.ReadFile(c.CA)
		if err != nil {
			return nil, fmt.Errorf("read --etcd-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--etcd-ca %s: no PEM certificate in it", c.CA)
		}
		conf.RootCAs = pool
	}
	if (c.Cert == "") != (c.Key == "") {
		return nil, errors.New("--etcd-cert and --etcd-key go together")
	}
	if c.Cert != "" {
		pair, err := tls.LoadX509KeyPair(c.Cert, c.Key)
		if err != nil {
			return nil, fmt.Errorf("load --etcd-cert/--etcd-key: %w", err)
		}
		conf.Certificates = []tls.Certificate{pair}
	}
	return conf, nil
}
