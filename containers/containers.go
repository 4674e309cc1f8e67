// Package containers finds where a docker or podman container runs: the
// cgroup of a container named in a policy's match.container.
//
// Both runtimes serve the Docker Engine API on a unix socket (podman's
// compatibility API at the same paths), and GET /containers/NAME/json
// gives the container's id and, while it runs, its init's pid. The
// container's cgroup is read from /proc/PID/cgroup, which holds for either
// cgroup driver; a stopped container's cgroup is where the runtime will
// make it with the systemd driver (docker-ID.scope, libpod-ID.scope), so
// that its start is followed by the kernel from the cgroup's mkdir.
package containers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"time"
)

// DefaultSockets are docker's and podman's (rootful) API sockets.
var DefaultSockets = []string{"/run/docker.sock", "/run/podman/podman.sock"}

// ErrNotFound: no runtime knows the container.
var ErrNotFound = errors.New("no such container")

// Container is what a runtime says of one container.
type Container struct {
	ID      string
	Pid     int    // its init's pid while it runs, 0 otherwise
	Runtime string // "docker" or "podman", by the socket that answered
}

// Resolver asks runtimes about containers.
type Resolver struct {
	Sockets []string      // tried in order; a missing socket is skipped
	Timeout time.Duration // per request; 0: 2 s
}

// Lookup finds the container called name.
func (r Resolver) Lookup(ctx context.Context, name string) (Container, error) {
	var errs []error
	for _, sock := range r.Sockets {
		if _, err := os.Stat(sock); err != nil {
			continue
		}
		c, err := r.inspect(ctx, sock, name)
		if err == nil {
			return c, nil
		}
		if !errors.Is(err, ErrNotFound) {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return Container{}, errors.Join(errs...)
	}
	return Container{}, fmt.Errorf("container %s: %w", name, ErrNotFound)
}

// inspectReply is the part of the Engine API's container JSON read here.
type inspectReply struct {
	ID    string `json:"Id"`
	State struct {
		Pid     int  `json:"Pid"`
		Running bool `json:"Running"`
	} `json:"State"`
}

func (r Resolver) inspect(ctx context.Context, sock, name string) (Container, error) {
	timeout := r.Timeout
	if timeout == 0 {
		timeout = 2 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	client := socketClient(sock)
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://runtime/containers/"+url.PathEscape(name)+"/json", nil)
	if err != nil {
		return Container{}, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return Container{}, fmt.Errorf("ask %s about container %s: %w", sock, name, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return Container{}, ErrNotFound
	case resp.StatusCode != http.StatusOK:
		return Container{}, fmt.Errorf("ask %s about container %s: %s", sock, name, resp.Status)
	}
	var reply inspectReply
	if err := json.NewDecoder(resp.Body).Decode(&reply); err != nil {
		return Container{}, fmt.Errorf("ask %s about container %s: %w", sock, name, err)
	}
	if reply.ID == "" {
		return Container{}, fmt.Errorf("ask %s about container %s: no Id in the answer", sock, name)
	}
	c := Container{ID: reply.ID, Runtime: "docker"}
	if isPodman(resp.Header.Get("Server"), sock) {
		c.Runtime = "podman"
	}
	if reply.State.Running {
		c.Pid = reply.State.Pid
	}
	return c, nil
}

// socketClient speaks HTTP to the API on the unix socket sock.
func socketClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
}

func isPodman(server, sock string) bool {
	return len(server) >= 6 && server[:6] == "Libpod" || sock == "/run/podman/podman.sock"
}

// ScopeName is the cgroup a stopped container gets when it starts, under
// the systemd cgroup driver: docker-ID.scope (in system.slice) or
// libpod-ID.scope (in machine.slice), as a path below the cgroup root.
func (c Container) ScopeName() string {
	if c.Runtime == "podman" {
		return "machine.slice/libpod-" + c.ID + ".scope"
	}
	return "system.slice/docker-" + c.ID + ".scope"
}

// Event is one container event of a runtime's event stream.
type Event struct {
	Action string // create, start, die, destroy, rename, ...
	ID     string
	Name   string
}

// eventReply is the part of the Engine API's event JSON read here.
type eventReply struct {
	Type   string `json:"Type"`
	Action string `json:"Action"`
	Actor  struct {
		ID         string            `json:"ID"`
		Attributes map[string]string `json:"Attributes"`
	} `json:"Actor"`
}

// eventsPath asks for container events only: a runtime also reports
// images, networks and volumes, which never move a container's cgroup.
var eventsPath = "/events?filters=" + url.QueryEscape(`{"type":["container"]}`)

// Events follows the container events of the runtime on sock (GET
// /events, served by docker and by podman's compatibility API), calling
// subscribed once the runtime answered and then onEvent for each event,
// until the stream ends, fails or ctx ends. It returns why it stopped.
func Events(ctx context.Context, sock string, subscribed func(), onEvent func(Event)) error {
	client := socketClient(sock)
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://runtime"+eventsPath, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("follow the events of %s: %w", sock, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("follow the events of %s: %s", sock, resp.Status)
	}
	subscribed()
	dec := json.NewDecoder(resp.Body)
	for {
		var ev eventReply
		if err := dec.Decode(&ev); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("follow the events of %s: %w", sock, err)
		}
		if ev.Type != "" && ev.Type != "container" {
			continue
		}
		onEvent(Event{Action: ev.Action, ID: ev.Actor.ID, Name: ev.Actor.Attributes["name"]})
	}
}

// Moves reports whether an event of this action can change where a
// container's cgroup is: made, started, gone or renamed. Exec, health
// and attach events, many on a busy host, cannot.
func (e Event) Moves() bool {
	switch e.Action {
	case "create", "init", "start", "restart", "die", "destroy", "remove", "rename":
		return true
	}
	return false
}
