// Command bulk is the Tsunami/UDT-style transfer of package bulk as a
// program: a server of a directory and its client. Built with
// CGO_ENABLED=0 it is a static Go binary, as the pinhole tests want.
//
//	bulk serve --listen 10.9.0.5:4600 --ports 40000-40100 --dir /srv/data
//	bulk get --server 10.9.0.5:4600 --out big.bin big.bin
//	bulk put --server 10.9.0.5:4600 ./big.bin
//
// get and put print one JSON line of what the transfer did.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/procgate/procgate/internal/bulk"
)

const usage = `usage:
  bulk serve --listen ADDR --ports MIN-MAX --dir DIR [--rate MB/s]
  bulk get --server HOST:PORT [--out FILE] NAME
  bulk put --server HOST:PORT [--name NAME] [--rate MB/s] FILE`

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "bulk:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return errors.New(usage)
	}
	fs := flag.NewFlagSet("bulk "+args[0], flag.ContinueOnError)
	listen := fs.String("listen", "", "serve: control address, host:port")
	ports := fs.String("ports", "", "serve: UDP data ports, MIN-MAX")
	dir := fs.String("dir", ".", "serve: the directory served")
	server := fs.String("server", "", "get, put: the server's control address")
	out := fs.String("out", "", "get: the file written (default: NAME)")
	name := fs.String("name", "", "put: the name on the server (default: the file's base name)")
	rate := fs.Float64("rate", 0, "the sender's starting rate in MB/s (default 400)")
	timeout := fs.Duration("timeout", 60*time.Second, "get, put: bound on the set-up")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	switch args[0] {
	case "serve":
		lo, hi, err := parseRange(*ports)
		if err != nil {
			return fmt.Errorf("--ports: %w", err)
		}
		if *listen == "" {
			return errors.New("serve: --listen is required")
		}
		ln, err := net.Listen("tcp", *listen)
		if err != nil {
			return err
		}
		log := slog.New(slog.NewTextHandler(os.Stderr, nil))
		log.Info("serving", "listen", ln.Addr().String(), "ports", *ports, "dir", *dir)
		return (&bulk.Server{Dir: *dir, PortMin: lo, PortMax: hi, Rate: *rate * 1e6, Log: log}).Serve(ln)
	case "get", "put":
		if *server == "" || fs.NArg() != 1 {
			return fmt.Errorf("%s: want --server and one file\n%s", args[0], usage)
		}
		cl := &bulk.Client{Server: *server, Rate: *rate * 1e6, Timeout: *timeout}
		var st bulk.Stats
		var err error
		if args[0] == "get" {
			st, err = get(cl, fs.Arg(0), *out)
		} else {
			st, err = put(cl, fs.Arg(0), *name)
		}
		if err != nil {
			return err
		}
		return json.NewEncoder(os.Stdout).Encode(map[string]any{
			"bytes": st.Bytes, "sha256": st.SHA256, "passes": st.Passes, "sent": st.Sent,
			"port": st.Port, "seconds": st.Took.Seconds()})
	}
	return fmt.Errorf("unknown command %q\n%s", args[0], usage)
}

func get(cl *bulk.Client, name, out string) (bulk.Stats, error) {
	if out == "" {
		out = filepath.Base(name)
	}
	f, err := os.Create(out)
	if err != nil {
		return bulk.Stats{}, err
	}
	st, err := cl.Get(name, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return st, err
}

func put(cl *bulk.Client, path, name string) (bulk.Stats, error) {
	if name == "" {
		name = filepath.Base(path)
	}
	f, err := os.Open(path)
	if err != nil {
		return bulk.Stats{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return bulk.Stats{}, err
	}
	return cl.Put(name, f, fi.Size())
}

func parseRange(s string) (lo, hi int, err error) {
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		b = a
	}
	if lo, err = strconv.Atoi(a); err == nil {
		hi, err = strconv.Atoi(b)
	}
	if err != nil || lo < 1 || hi < lo || hi > 65535 {
		return 0, 0, fmt.Errorf("%q: want MIN-MAX within 1-65535", s)
	}
	return lo, hi, nil
}
