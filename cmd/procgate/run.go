package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/procgate/procgate/api"
	"github.com/procgate/procgate/launch"
	"github.com/procgate/procgate/ruleset"
)

func runCmd(client func() api.Client) *cobra.Command {
	var app string
	var usePty bool
	cmd := &cobra.Command{
		Use:   "run --app NAME [--] CMD [ARGS...]",
		Short: "Run CMD as application NAME: in its cgroup, environment scrubbed, binary checked",
		Long: `Runs CMD as application NAME, for the calling user, with the caller's stdin,
stdout and stderr, signals relayed and the exit status returned.

The app runs in the caller's namespaces (network, mount, UTS, IPC, cgroup,
pid), below its root, in its working directory and with its umask. A caller
in a user namespace of its own is refused, as is one whose namespaces cannot
be entered: the app never runs in the daemon's namespaces instead.

With --pty, the default when stdin is a terminal, the app gets a terminal of
its own: a new pty, relayed to this one (set raw meanwhile), as its
controlling terminal, so /dev/tty works (ssh's password prompt, sudo,
pinentry), the window size follows, and ^Z stops the app and this command
(fg continues both). Stdout and stderr then both go to the pty. --pty=false
passes stdin, stdout and stderr as they are.

Root starts the process itself; any other user asks the daemon, which checks
the user against the app's users: list and starts the process as that user
(uid, gid, groups) directly inside the app's cgroup. Loader variables
(LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, GCONV_PATH, ...) are removed, and the
binary must be one of the app's exe: (root-owned, not writable by the caller,
sha256 if given).

The process runs under the trace guard unless the app says traceable: true:
its real gid is the daemon's --guard-gid (default: group procgate-guard) while its
effective gid stays the user's, so no process without CAP_SYS_PTRACE, not
even another of the same user, can ptrace it, read or write its memory or
copy its sockets with pidfd_getfd. Files it creates keep the user's group.
The kernel treats such a process as set-group-ID: the loader ignores LD_*
variables, secure_getenv() returns nothing (OpenSSL's SSL_CERT_FILE, Kerberos'
KRB5_CONFIG), and a shell started without -p sets its effective gid to the
guard gid (what it creates then has that group). Scripts (#!) run without the
guard: Perl, for one, would refuse to run set-group-ID with its environment.

Exit status: the app's own; 128+N when signal N ended it (procgate re-raises
the signal on itself); 125 when procgate run itself failed (bad flags, daemon
unreachable, refused); 126 when the command was found but could not be
executed (permission, not one of the app's exe:); 127 when it was not found.`,
		Example: `  procgate run --app psql-prod -- psql -h 10.1.2.3 prod
  procgate run --app ops -- ssh admin@10.1.2.3
  procgate run --app ops --pty=false -- procgate dial 10.1.2.3:22 > out.txt`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return runFailed{launch.StatusFailed, errors.New("run: no command given (procgate run --app NAME -- CMD [ARGS...])")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if app == "" {
				return runFailed{launch.StatusFailed, errors.New(`run: required flag "--app" not set`)}
			}
			if !cmd.Flags().Changed("pty") {
				usePty = term.IsTerminal(int(os.Stdin.Fd()))
			}
			var err error
			if os.Geteuid() == 0 {
				err = runAsRoot(client(), app, args, usePty)
			} else {
				err = runViaDaemon(client(), app, args, usePty)
			}
			var ec exitCode
			if err == nil || errors.As(err, &ec) || errors.As(err, new(runFailed)) {
				return err
			}
			return runFailed{launch.StatusOf(err), err}
		},
	}
	cmd.Flags().StringVar(&app, "app", "", "application name (required)")
	cmd.Flags().BoolVar(&usePty, "pty", false, "give the app a terminal of its own (a new pty relayed to this one): /dev/tty, job control, window size (default: when stdin is a terminal)")
	cmd.Flags().SetInterspersed(false)
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return runFailed{launch.StatusFailed, fmt.Errorf("run: %w", err)}
	})
	return cmd
}

// runFailed is `procgate run` failing itself: main prints err and exits
// with status (launch.StatusFailed, StatusCannotExec or StatusNotFound), so
// that the app's own statuses keep their meaning.
type runFailed struct {
	status int
	err    error
}

func (r runFailed) Error() string { return r.err.Error() }
func (r runFailed) Unwrap() error { return r.err }

func runAsRoot(c api.Client, name string, argv []string, usePty bool) error {
	resp, err := c.Do(api.Request{Op: api.OpAppInfo, App: name})
	if err != nil {
		return err
	}
	info := resp.AppInfo
	app := ruleset.App{Name: info.Name, Users: info.Users, KeepCaps: info.KeepCaps, Traceable: info.Traceable}
	for i, p := range info.Exe {
		app.Exe = append(app.Exe, ruleset.Exe{Path: p, SHA256: info.SHA256[i]})
	}
	dir, err := os.Getwd()
	if err != nil {
		return fmt.Errorf("current directory: %w", err)
	}
	sess, err := newSession(usePty)
	if err != nil {
		return fmt.Errorf("open a pty for the app: %w", err)
	}
	defer sess.close()
	proc, err := launch.Start(launch.Spec{
		App: app, CgroupDir: info.Cgroup, Argv: argv, Env: os.Environ(), Dir: dir,
		Stdio: sess.stdio(), Tty: usePty,
		GuardGID: info.GuardGID,
		Untraced: func(why string) error {
			_, err := c.Do(api.Request{Op: api.OpAppInfo, App: name, Untraced: why})
			return err
		},
	})
	if err != nil {
		return err
	}
	sess.started(func(sig syscall.Signal) { _ = proc.Relay(sig) })
	exit, err := proc.WaitJob(func(stop syscall.Signal) {
		if stop != 0 {
			sess.stopped()
		}
	})
	if err != nil {
		return err
	}
	return sess.exit(exit.Code, exit.Signal)
}

func runViaDaemon(c api.Client, name string, argv []string, usePty bool) error {
	dir, err := os.Getwd()
	if err != nil {
		return fmt.Errorf("current directory: %w", err)
	}
	req := api.Request{Op: api.OpRun, App: name, Argv: argv, Env: os.Environ(), Dir: dir, Pty: usePty}
	// The daemon takes the working directory from this descriptor, opened
	// here as the user, never by resolving the path as root.
	cwd, err := os.OpenFile(".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open the current directory: %w", err)
	}
	defer cwd.Close()
	conn, err := dialRaw(c.Socket)
	if err != nil {
		return err
	}
	defer conn.Close()
	line, err := jsonLine(req)
	if err != nil {
		return err
	}
	sess, err := newSession(usePty)
	if err != nil {
		return fmt.Errorf("open a pty for the app: %w", err)
	}
	defer sess.close()
	stdio := sess.stdio()
	if err := launch.SendWithFds(conn, line, stdio[0], stdio[1], stdio[2], cwd); err != nil {
		return fmt.Errorf("send run request: %w", err)
	}
	cwd.Close()
	sess.started(func(sig syscall.Signal) {
		_ = api.WriteLine(conn, api.Request{Op: api.OpRun, Signal: int(sig)})
	})
	r := bufio.NewReader(conn)
	for {
		resp, err := api.ReadResponse(r)
		if err != nil {
			if resp != nil && resp.ExitCode != 0 {
				return runFailed{resp.ExitCode, err}
			}
			if errors.Is(err, io.EOF) {
				return errors.New("the daemon closed the connection before the app exited (see its log)")
			}
			return err
		}
		switch {
		case resp.Run == nil:
		case resp.Run.Exited:
			return sess.exit(resp.Run.Code, syscall.Signal(resp.Run.Signal))
		case resp.Run.Stopped != 0:
			sess.stopped()
		}
	}
}

// exitLike ends procgate as the child ended: same code, or the same signal
// (re-raised with its default action), so shells and supervisors see the
// child's status.
func exitLike(code int, sig syscall.Signal) error {
	if sig == 0 {
		return exitCode(code)
	}
	signal.Reset(sig)
	// Go's runtime keeps its own handler even after Reset, and ignores some
	// signals (SIGUSR1, SIGUSR2) it was not asked to notify: restore the
	// kernel's default action before raising.
	act := struct {
		handler  uintptr // SIG_DFL
		flags    uint64
		restorer uintptr
		mask     uint64
	}{}
	_, _, _ = syscall.RawSyscall6(syscall.SYS_RT_SIGACTION, uintptr(sig), uintptr(unsafe.Pointer(&act)), 0, 8, 0, 0)
	_ = syscall.Kill(os.Getpid(), sig)
	time.Sleep(100 * time.Millisecond) // a signal whose default is to ignore falls through
	return exitCode(128 + int(sig))
}

func dialCmd() *cobra.Command {
	var timeout time.Duration
	var resolver string
	cmd := &cobra.Command{
		Use:   "dial ADDR:PORT[/tcp|udp]",
		Short: "Try one connection from this process and print what came back (to test a policy)",
		Long: `Connects (TCP) or sends one datagram and waits for an answer (UDP) and prints
the first line received, or the error: "operation not permitted" is procgate's
denial. Run it under 'procgate run' to see what an app may reach.

ADDR may be a host name: it is resolved by this process first (through
--resolver, or the system's resolver), as an app would, so that a name grant
sees the answer; the first address is dialed.`,
		Example: `  procgate run --app psql-prod -- procgate dial 10.1.2.3:5432
  procgate dial '[fd00:1::5]:53/udp'
  procgate run --app psql-prod -- procgate dial --resolver 10.0.0.53:53 db.corp.example:5432`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			d, err := ruleset.ParseDest(args[0])
			label := ""
			if err != nil {
				name, port, proto, ok := splitNameDest(args[0])
				if !ok {
					return err
				}
				addr, rerr := resolveName(cmd.Context(), name, resolver, timeout)
				if rerr != nil {
					return fmt.Errorf("%s: resolve %s: %w", args[0], name, rerr)
				}
				d = ruleset.Dest{Addr: addr, Port: port, Proto: proto}
				label = args[0] + " (" + addr.String() + ")"
			}
			if label == "" {
				label = d.String()
			}
			line, err := dial(d, timeout)
			if err != nil {
				if errors.Is(err, syscall.EPERM) {
					return fmt.Errorf("%s: denied: %w", label, err)
				}
				return fmt.Errorf("%s: %w", label, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: %s\n", label, line)
			return nil
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Second, "give up after this long")
	cmd.Flags().StringVar(&resolver, "resolver", "", "resolve a host name with this DNS server (ADDR:PORT, over UDP) rather than the system's")
	return cmd
}

// splitNameDest splits NAME:PORT[/tcp|udp], where NAME is a host name.
func splitNameDest(s string) (name string, port uint16, proto ruleset.Proto, ok bool) {
	s, proto, ok = ruleset.CutProto(s)
	if !ok {
		return "", 0, 0, false
	}
	host, p, err := net.SplitHostPort(s)
	if err != nil || host == "" {
		return "", 0, 0, false
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return "", 0, 0, false // an address ParseDest refused: its error says why
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		return "", 0, 0, false
	}
	return host, uint16(n), proto, true
}

// resolveName looks name up as an ordinary client does, over UDP from this
// process (through resolver, ADDR:PORT, when set), and returns its first
// IPv4 address.
func resolveName(ctx context.Context, name, resolver string, timeout time.Duration) (netip.Addr, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	r := net.DefaultResolver
	if resolver != "" {
		if _, err := netip.ParseAddrPort(resolver); err != nil {
			return netip.Addr{}, fmt.Errorf("--resolver %q: want ADDR:PORT: %w", resolver, err)
		}
		r = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "udp", resolver)
		}}
	}
	addrs, err := r.LookupNetIP(ctx, "ip4", name)
	if err != nil {
		return netip.Addr{}, err
	}
	if len(addrs) == 0 {
		return netip.Addr{}, errors.New("no IPv4 address")
	}
	return addrs[0].Unmap(), nil
}

func dialRaw(socket string) (*net.UnixConn, error) {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("connect to procgate daemon at %s (is it running? set --socket or PROCGATE_SOCKET): %w", socket, err)
	}
	return conn, nil
}

func jsonLine(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// dial makes one attempt to d and returns the first line the peer sends.
func dial(d ruleset.Dest, timeout time.Duration) (string, error) {
	network := "tcp"
	if d.Proto == ruleset.UDP {
		network = "udp"
	}
	conn, err := net.DialTimeout(network, netip.AddrPortFrom(d.Addr, d.Port).String(), timeout)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if network == "udp" {
		if _, err := conn.Write([]byte("ping\n")); err != nil {
			return "", err
		}
	}
	buf := make([]byte, 512)
	n, err := conn.Read(buf)
	if err != nil && n == 0 {
		return "", err
	}
	return strings.TrimSpace(strings.SplitN(string(buf[:n]), "\n", 2)[0]), nil
}
