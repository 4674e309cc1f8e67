// Package ftpsite runs FTP for the pinhole tests and benchmarks: a vsftpd
// configuration of its own (passive mode, a pasv port range, plain or
// explicit TLS) serving a generated file of known checksum, curl as the
// external client, and a small passive-mode client in Go for the steps
// curl does too fast to watch (the hole between PASV and the data
// connection). vsftpd is Debian's package; the caller decides where and
// how the daemon runs (a namespace, an app's cgroup) from Site.Args.
package ftpsite

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// BigFile is the name of the generated file every site serves.
const BigFile = "big.bin"

// Options describe a site.
type Options struct {
	// Addr is the IPv4 address vsftpd listens on, Port its control port.
	Addr string
	Port int
	// PasvMin and PasvMax are the passive data ports (the aux range);
	// PasvAddress is the address the PASV answer names.
	PasvMin, PasvMax int
	PasvAddress      string
	// CertFile and KeyFile, when set, make the site explicit FTPS only
	// (AUTH TLS; logins and data must be protected).
	CertFile, KeyFile string
	// Size is the size of BigFile in bytes; Seed makes its contents.
	Size int64
	Seed uint64
}

// Site is one vsftpd configuration and the files it serves.
type Site struct {
	Dir  string // everything of the site, removed by Remove
	Conf string
	Log  string
	// Sum is the hex SHA-256 of BigFile.
	Sum  string
	Size int64
	TLS  bool
}

// ftpUser is the account anonymous sessions run as. vsftpd changes into
// its home before anon_root, so it must have one: Debian's vsftpd package
// makes "ftp" with /srv/ftp (nobody's home, /nonexistent, fails).
const ftpUser = "ftp"

// Setup writes a site under a new directory of the system's temp dir
// (world-traversable: vsftpd serves it as the ftp user from a chroot).
func Setup(o Options) (*Site, error) {
	if _, err := exec.LookPath("vsftpd"); err != nil {
		return nil, fmt.Errorf("vsftpd (Debian package vsftpd): %w", err)
	}
	dir, err := os.MkdirTemp("", "procgate-ftp-")
	if err != nil {
		return nil, err
	}
	s := &Site{Dir: dir, Conf: filepath.Join(dir, "vsftpd.conf"), Log: filepath.Join(dir, "vsftpd.log"),
		Size: o.Size, TLS: o.CertFile != ""}
	if err := s.write(o); err != nil {
		s.Remove()
		return nil, err
	}
	return s, nil
}

func (s *Site) write(o Options) error {
	root, empty := filepath.Join(s.Dir, "root"), filepath.Join(s.Dir, "empty")
	for _, d := range []string{root, empty} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(s.Dir, 0o755); err != nil {
		return err
	}
	sum, err := writeFile(filepath.Join(root, BigFile), o.Size, o.Seed)
	if err != nil {
		return err
	}
	s.Sum = sum
	conf := []string{
		"listen=YES", "listen_ipv6=NO",
		"listen_address=" + o.Addr, fmt.Sprintf("listen_port=%d", o.Port),
		"background=NO",
		"anonymous_enable=YES", "no_anon_password=YES", "local_enable=NO", "write_enable=NO",
		"ftp_username=" + ftpUser, "anon_root=" + root,
		"secure_chroot_dir=" + empty,
		"pasv_enable=YES", "port_enable=NO",
		fmt.Sprintf("pasv_min_port=%d", o.PasvMin), fmt.Sprintf("pasv_max_port=%d", o.PasvMax),
		"pasv_address=" + o.PasvAddress,
		// With vsftpd 3.0.3's seccomp sandbox, sessions die after the login
		// on Debian 12 with Linux 6.18 (seen here: curl gets "response
		// reading failed"); the tests are not about it.
		"seccomp_sandbox=NO",
		"connect_from_port_20=NO",
		"xferlog_enable=YES", "dual_log_enable=YES", "log_ftp_protocol=YES",
		"vsftpd_log_file=" + s.Log, "xferlog_file=" + s.Log + ".xfer",
	}
	if s.TLS {
		conf = append(conf,
			"ssl_enable=YES", "allow_anon_ssl=YES",
			"force_anon_logins_ssl=YES", "force_anon_data_ssl=YES",
			"rsa_cert_file="+o.CertFile, "rsa_private_key_file="+o.KeyFile,
			// vsftpd's default is DES-CBC3-SHA, which OpenSSL 3 refuses.
			"ssl_ciphers=HIGH")
	}
	return os.WriteFile(s.Conf, []byte(strings.Join(conf, "\n")+"\n"), 0o600)
}

// writeFile writes size pseudo-random bytes from seed and returns their
// hex SHA-256. Random bytes: no compression anywhere on the path helps.
func writeFile(path string, size int64, seed uint64) (string, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	_, err = io.Copy(io.MultiWriter(f, h), io.LimitReader(Random(seed), size))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Random is an endless reader of the pseudo-random bytes that seed makes.
func Random(seed uint64) io.Reader {
	var key [32]byte
	for i := range 8 {
		key[i] = byte(seed >> (8 * i))
	}
	return rand.NewChaCha8(key)
}

// Args is the command line that runs the site's vsftpd in the foreground.
func (s *Site) Args() []string { return []string{"vsftpd", s.Conf} }

// LogText is vsftpd's log so far (for a failing test's output).
func (s *Site) LogText() string {
	b, err := os.ReadFile(s.Log)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// Remove deletes the site's directory.
func (s *Site) Remove() error {
	if s.Dir == "" {
		return errors.New("no site directory")
	}
	return os.RemoveAll(s.Dir)
}
