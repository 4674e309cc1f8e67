package ftpsite

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/textproto"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// Curl is curl as the site's external client, run in the network
// namespace NetNS (nsenter), in passive mode with the PASV answer (not
// EPSV), so that the data port comes from the answer conntrack's FTP
// helper would have to read.
type Curl struct {
	NetNS string
	// CAFile, when set, makes curl require explicit TLS (AUTH TLS) and
	// verify the server with this CA.
	CAFile string
}

func (c Curl) cmd(ctx context.Context, url string) *exec.Cmd {
	args := []string{"--net=" + c.NetNS, "curl", "-sS", "--fail", "--ftp-pasv", "--disable-epsv",
		"--connect-timeout", "30", "--max-time", "300", "-v"}
	if c.CAFile != "" {
		args = append(args, "--ssl-reqd", "--cacert", c.CAFile)
	}
	return exec.CommandContext(ctx, "nsenter", append(args, url)...)
}

// Transfer is what a curl download did.
type Transfer struct {
	Bytes int64
	Sum   string // hex SHA-256 of what arrived
	// DataPort is the passive port curl connected to (from its log).
	DataPort int
	Took     time.Duration
}

// Get downloads url, hashing it on the way, and returns what arrived; the
// error carries curl's log.
func (c Curl) Get(ctx context.Context, url string) (Transfer, error) {
	h := sha256.New()
	cw := &countWriter{w: h}
	var log bytes.Buffer
	cmd := c.cmd(ctx, url)
	cmd.Stdout, cmd.Stderr = cw, &log
	t0 := time.Now()
	err := cmd.Run()
	tr := Transfer{Bytes: cw.n, Sum: hex.EncodeToString(h.Sum(nil)), Took: time.Since(t0), DataPort: dataPort(log.String())}
	if err != nil {
		return tr, fmt.Errorf("curl %s: %w\n%s", url, err, log.String())
	}
	return tr, nil
}

// List returns the directory listing at url (ending in /).
func (c Curl) List(ctx context.Context, url string) (string, error) {
	var out, log bytes.Buffer
	cmd := c.cmd(ctx, url)
	cmd.Stdout, cmd.Stderr = &out, &log
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("curl %s: %w\n%s", url, err, log.String())
	}
	return out.String(), nil
}

// dataPort finds "Connecting to ADDR (ADDR) port N" in curl's verbose log:
// the passive data connection (the control connection's line says
// "Connected to").
func dataPort(log string) int {
	for line := range strings.Lines(log) {
		if i := strings.Index(line, "Connecting to "); i >= 0 {
			f := strings.Fields(line[i:])
			if len(f) >= 6 && f[4] == "port" {
				if p, err := strconv.Atoi(f[5]); err == nil {
					return p
				}
			}
		}
	}
	return 0
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Dialer dials from wherever the client is (a test's namespace).
type Dialer func(network, addr string) (net.Conn, error)

// Client is a passive-mode FTP client that goes one step at a time, so
// that a test can look at the perimeter between PASV and the data
// connection.
type Client struct {
	dial Dialer
	tls  *tls.Config
	c    net.Conn
	tp   *textproto.Conn
}

// Login connects to addr, with explicit TLS if tlsConf is set (AUTH TLS,
// PBSZ 0, PROT P), logs in as anonymous and switches to binary.
func Login(dial Dialer, addr string, tlsConf *tls.Config) (*Client, error) {
	c, err := dial("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("ftp control %s: %w", addr, err)
	}
	cl := &Client{dial: dial, c: c, tp: textproto.NewConn(c)}
	if _, _, err := cl.tp.ReadResponse(220); err != nil {
		cl.Close()
		return nil, fmt.Errorf("ftp greeting: %w", err)
	}
	if tlsConf != nil {
		if err := cl.cmd(234, "AUTH TLS"); err != nil {
			cl.Close()
			return nil, err
		}
		// vsftpd wants the data connections to resume the control
		// connection's session (require_ssl_reuse): one cache for both.
		cl.tls = tlsConf.Clone()
		if cl.tls.ClientSessionCache == nil {
			cl.tls.ClientSessionCache = tls.NewLRUClientSessionCache(4)
		}
		tc := tls.Client(c, cl.tls)
		if err := tc.Handshake(); err != nil {
			cl.Close()
			return nil, fmt.Errorf("ftp control TLS: %w", err)
		}
		cl.c, cl.tp = tc, textproto.NewConn(tc)
		for _, s := range []string{"PBSZ 0", "PROT P"} {
			if err := cl.cmd(200, "%s", s); err != nil {
				cl.Close()
				return nil, err
			}
		}
	}
	code, _, err := cl.exchange(0, "USER anonymous")
	if err == nil {
		if code == 331 {
			err = cl.cmd(230, "PASS procgate@")
		} else if code != 230 {
			err = fmt.Errorf("USER anonymous: answer %d", code)
		}
	}
	if err == nil {
		err = cl.cmd(200, "TYPE I")
	}
	if err != nil {
		cl.Close()
		return nil, err
	}
	return cl, nil
}

// exchange sends a command and reads its answer; want 0 takes any code.
// One command at a time: FTP does not pipeline.
func (cl *Client) exchange(want int, format string, args ...any) (int, string, error) {
	verb := strings.Fields(fmt.Sprintf(format, args...) + " ?")[0]
	if err := cl.tp.PrintfLine(format, args...); err != nil {
		return 0, "", fmt.Errorf("ftp %s: %w", verb, err)
	}
	code, msg, err := cl.tp.ReadResponse(want)
	if err != nil {
		return code, msg, fmt.Errorf("ftp %s: %w", verb, err)
	}
	return code, msg, nil
}

func (cl *Client) cmd(want int, format string, args ...any) error {
	_, _, err := cl.exchange(want, format, args...)
	return err
}

// Pasv asks for a passive data port and returns the address the answer
// names: from then on the server listens there.
func (cl *Client) Pasv() (netip.AddrPort, error) {
	_, msg, err := cl.exchange(227, "PASV")
	if err != nil {
		return netip.AddrPort{}, err
	}
	return ParsePasv(msg)
}

// ParsePasv reads the address of a 227 answer's text, "Entering Passive
// Mode (h1,h2,h3,h4,p1,p2)."
func ParsePasv(msg string) (netip.AddrPort, error) {
	i, j := strings.IndexByte(msg, '('), strings.IndexByte(msg, ')')
	if i < 0 || j < i {
		return netip.AddrPort{}, fmt.Errorf("PASV answer %q: no (h1,h2,h3,h4,p1,p2)", msg)
	}
	f := strings.Split(msg[i+1:j], ",")
	if len(f) != 6 {
		return netip.AddrPort{}, fmt.Errorf("PASV answer %q: want 6 numbers, got %d", msg, len(f))
	}
	var b [6]byte
	for k, s := range f {
		n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 8)
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("PASV answer %q: %w", msg, err)
		}
		b[k] = byte(n)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[:4])), uint16(b[4])<<8|uint16(b[5])), nil
}

// Retr downloads name over a data connection to data (the address Pasv
// gave) into w and returns the bytes copied.
func (cl *Client) Retr(name string, data netip.AddrPort, w io.Writer) (int64, error) {
	dc, err := cl.dial("tcp", data.String())
	if err != nil {
		return 0, fmt.Errorf("ftp data %s: %w", data, err)
	}
	defer dc.Close()
	if err := cl.cmd(150, "RETR %s", name); err != nil {
		return 0, err
	}
	var r io.Reader = dc
	if cl.tls != nil {
		tc := tls.Client(dc, cl.tls)
		if err := tc.Handshake(); err != nil {
			return 0, fmt.Errorf("ftp data TLS: %w", err)
		}
		r = tc
	}
	n, err := io.Copy(w, r)
	if err != nil {
		return n, fmt.Errorf("ftp data %s: %w", data, err)
	}
	dc.Close()
	if _, _, err := cl.tp.ReadResponse(226); err != nil {
		return n, fmt.Errorf("ftp RETR %s end: %w", name, err)
	}
	return n, nil
}

// Close says QUIT and closes the control connection.
func (cl *Client) Close() error {
	cl.c.SetDeadline(time.Now().Add(2 * time.Second))
	cl.tp.PrintfLine("QUIT")
	return cl.c.Close()
}
