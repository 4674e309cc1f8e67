// Package pki is a small certificate authority for procgate's mTLS: the
// perimeter gateway and the agents that ask it for pinholes. It makes a CA,
// issues ECDSA P-256 client and server certificates, writes them as PEM
// files readable by their owner only, and builds the tls.Configs both sides
// use. It is for tests and first users; a site with its own PKI points the
// gateway at its files instead.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// File names inside a PKI directory.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// Usage says what a certificate is for.
type Usage int

const (
	Client Usage = 1 << iota // an agent: its common name is its delegate name
	Server                   // a gateway: its SANs are the names clients dial
)

// ParseUsage reads "client", "server" or "both".
func ParseUsage(s string) (Usage, error) {
	switch s {
	case "client":
		return Client, nil
	case "server":
		return Server, nil
	case "both":
		return Client | Server, nil
	}
	return 0, fmt.Errorf("usage %q: want client, server or both", s)
}

// CA is a certificate authority: its certificate and key.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// Issued is a certificate and its key, PEM encoded.
type Issued struct {
	CertPEM, KeyPEM []byte
}

// nameRE is what a certificate's common name may be here: a delegate name
// for the gateway's rules (see perimeter), or a host name.
var nameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._@+-]{0,63}$`)

// Validity bounds. A zero validity is DefaultValidity; a negative one
// would write a certificate that is expired when written. Ten years is the
// most: a CA key kept longer outlives the advice for P-256 keys and,
// likelier, the people who know where it is.
const (
	DefaultValidity = 365 * 24 * time.Hour
	MaxValidity     = 3650 * 24 * time.Hour
)

// checkValidity returns validity, or DefaultValidity for 0, or why it is
// refused.
func checkValidity(name string, validity time.Duration) (time.Duration, error) {
	switch {
	case validity == 0:
		return DefaultValidity, nil
	case validity < 0 || validity > MaxValidity:
		return 0, fmt.Errorf("certificate %s: validity %v out of range: want more than 0 and at most %d days", name, validity, MaxValidity/(24*time.Hour))
	}
	return validity, nil
}

// newCert makes a key and a certificate for it from tmpl, filling in the
// serial number and the validity period: signed by parent and ending no
// later than parent, or self-signed if parent is nil.
func newCert(tmpl *x509.Certificate, validity time.Duration, parent *CA) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	name := tmpl.Subject.CommonName
	validity, err := checkValidity(name, validity)
	if err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key for %s: %w", name, err)
	}
	tmpl.SerialNumber, err = rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, fmt.Errorf("make serial number for %s: %w", name, err)
	}
	now := time.Now()
	tmpl.NotBefore = now.Add(-time.Minute) // tolerate a little clock skew
	tmpl.NotAfter = now.Add(validity)
	signer, signerKey := tmpl, key
	if parent != nil {
		signer, signerKey = parent.Cert, parent.Key
		if tmpl.NotAfter.After(parent.Cert.NotAfter) {
			tmpl.NotAfter = parent.Cert.NotAfter
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		return nil, nil, fmt.Errorf("sign certificate for %s: %w", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("parse certificate for %s: %w", name, err)
	}
	return cert, key, nil
}

// NewCA makes a self-signed CA named name, valid for validity (0:
// DefaultValidity).
func NewCA(name string, validity time.Duration) (*CA, error) {
	cert, key, err := newCert(&x509.Certificate{
		Subject:               pkix.Name{CommonName: name},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}, validity, nil)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key}, nil
}

// CertPEM returns the CA certificate, PEM encoded.
func (ca *CA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
}

// IssueRequest describes a certificate to issue.
type IssueRequest struct {
	// Name is the common name: for a client, the delegate name the gateway
	// authorizes.
	Name  string
	Usage Usage
	// Hosts are DNS names and IP addresses put in the SANs; a server
	// certificate needs at least one (Go verifies servers by SAN only).
	Hosts []string
	// Validity is how long the certificate is valid (at most the CA's
	// remaining time and MaxValidity); 0: DefaultValidity.
	Validity time.Duration
}

// Issue signs a new key's certificate as req asks.
func (ca *CA) Issue(req IssueRequest) (*Issued, error) {
	if !nameRE.MatchString(req.Name) {
		return nil, fmt.Errorf("name %q: want letters, digits and ._@+-, at most 64", req.Name)
	}
	if req.Usage == 0 {
		return nil, errors.New("certificate usage: want client, server or both")
	}
	if req.Usage&Server != 0 && len(req.Hosts) == 0 {
		return nil, fmt.Errorf("server certificate %s: name at least one DNS name or IP address the clients dial", req.Name)
	}
	tmpl := &x509.Certificate{
		Subject:  pkix.Name{CommonName: req.Name},
		KeyUsage: x509.KeyUsageDigitalSignature,
	}
	if req.Usage&Client != 0 {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	if req.Usage&Server != 0 {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	for _, h := range req.Hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	cert, key, err := newCert(tmpl, req.Validity, ca)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key for %s: %w", req.Name, err)
	}
	return &Issued{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}, nil
}

// writeNew writes data to a new file readable by its owner only; it
// refuses to replace a file, so that a key is never overwritten by mistake.
func writeNew(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// Init makes a CA named name in dir (created 0700 if missing) as ca.crt and
// ca.key, both 0600. It refuses a directory that already has a CA.
func Init(dir, name string, validity time.Duration) (*CA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create PKI directory: %w", err)
	}
	for _, f := range []string{CACertFile, CAKeyFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return nil, fmt.Errorf("%s already exists: this directory has a CA", filepath.Join(dir, f))
		}
	}
	ca, err := NewCA(name, validity)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return nil, fmt.Errorf("encode CA key: %w", err)
	}
	// The key first: a directory with a certificate and no key would be
	// refused by the next Init and useless to Issue.
	if err := writeNew(filepath.Join(dir, CAKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})); err != nil {
		return nil, err
	}
	if err := writeNew(filepath.Join(dir, CACertFile), ca.CertPEM()); err != nil {
		return nil, err
	}
	return ca, nil
}

// LoadCA reads the CA that Init wrote in dir.
func LoadCA(dir string) (*CA, error) {
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("load CA from %s: %w", dir, err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("parse CA certificate in %s: %w", dir, err)
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || !cert.IsCA {
		return nil, fmt.Errorf("%s does not hold an ECDSA CA", dir)
	}
	return &CA{Cert: cert, Key: key}, nil
}

// IssueFiles issues a certificate with the CA in dir and writes it as
// NAME.crt and NAME.key (0600) beside the CA. It returns their paths.
func IssueFiles(dir string, req IssueRequest) (certPath, keyPath string, err error) {
	ca, err := LoadCA(dir)
	if err != nil {
		return "", "", err
	}
	issued, err := ca.Issue(req)
	if err != nil {
		return "", "", err
	}
	certPath, keyPath = filepath.Join(dir, req.Name+".crt"), filepath.Join(dir, req.Name+".key")
	if _, err := os.Stat(keyPath); err == nil {
		return "", "", fmt.Errorf("%s already exists; remove it to issue %s again", keyPath, req.Name)
	}
	if err := writeNew(keyPath, issued.KeyPEM); err != nil {
		return "", "", err
	}
	if err := writeNew(certPath, issued.CertPEM); err != nil {
		os.Remove(keyPath)
		return "", "", err
	}
	return certPath, keyPath, nil
}

// Files are the PEM files one side of an mTLS connection uses.
type Files struct {
	Cert, Key, CA string
}

func (f Files) load() (tls.Certificate, *x509.CertPool, error) {
	pair, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("load certificate %s and key %s: %w", f.Cert, f.Key, err)
	}
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("read CA %s: %w", f.CA, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return tls.Certificate{}, nil, fmt.Errorf("CA %s holds no PEM certificate", f.CA)
	}
	return pair, pool, nil
}

// ServerConfig is ServerTLS with the files of f.
func ServerConfig(f Files) (*tls.Config, error) {
	pair, pool, err := f.load()
	if err != nil {
		return nil, err
	}
	return ServerTLS(pair, pool), nil
}

// ClientConfig is ClientTLS with the files of f.
func ClientConfig(f Files) (*tls.Config, error) {
	pair, pool, err := f.load()
	if err != nil {
		return nil, err
	}
	return ClientTLS(pair, pool), nil
}

// ServerTLS is a TLS 1.3 server presenting cert that requires a client
// certificate signed by one of cas.
func ServerTLS(cert tls.Certificate, cas *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    cas,
	}
}

// ClientTLS is a TLS 1.3 client presenting cert that trusts only cas.
func ClientTLS(cert tls.Certificate, cas *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      cas,
	}
}

// Pool is a pool holding only the CA's certificate.
func (ca *CA) Pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return pool
}

// Pair is the issued certificate and key for a tls.Config.
func (i *Issued) Pair() (tls.Certificate, error) {
	return tls.X509KeyPair(i.CertPEM, i.KeyPEM)
}

// Hosts splits a comma-separated list of SANs, dropping empty items.
func Hosts(s string) []string {
	var out []string
	for _, h := range strings.Split(s, ",") {
		if h = strings.TrimSpace(h); h != "" {
			out = append(out, h)
		}
	}
	return out
}
