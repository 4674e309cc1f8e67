package perimeter

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"
)

// Client speaks the gateway's API for one delegate (its certificate).
type Client struct {
	// URL is the gateway's base URL, https://HOST:PORT.
	URL  string
	HTTP *http.Client
}

// connectTimeout bounds the TCP connect and the TLS handshake with a
// gateway.
const connectTimeout = 5 * time.Second

// NewClient is a client of the gateway at url that authenticates with the
// certificate in tlsConf.
func NewClient(url string, tlsConf *tls.Config) *Client {
	return &Client{
		URL: strings.TrimSuffix(url, "/"),
		HTTP: &http.Client{
			Timeout: 30 * time.Second,
			// A router that is gone drops the connection attempt: the
			// dial and handshake give up well before the request's
			// timeout, so that an agent with several gateways moves on.
			Transport: &http.Transport{TLSClientConfig: tlsConf, ForceAttemptHTTP2: true,
				DialContext:         (&net.Dialer{Timeout: connectTimeout, KeepAlive: 30 * time.Second}).DialContext,
				TLSHandshakeTimeout: connectTimeout},
		},
	}
}

// APIError is an error answer of the gateway.
type APIError struct {
	Status int
	// Message is the gateway's error; Field names the bad value of a 400,
	// Rule the deciding rule or limit of a 403.
	Message string `json:"error"`
	Field   string `json:"field"`
	Rule    string `json:"rule"`
}

func (e *APIError) Error() string {
	return fmt.Sprintf("gateway: %d %s: %s", e.Status, http.StatusText(e.Status), e.Message)
}

func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
	var body bytes.Buffer
	if in != nil {
		if err := json.NewEncoder(&body).Encode(in); err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
	}
	req, err := http.NewRequestWithContext(ctx, method, c.URL+path, &body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return fmt.Errorf("gateway %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		apiErr := &APIError{Status: resp.StatusCode}
		if err := json.NewDecoder(resp.Body).Decode(apiErr); err != nil {
			apiErr.Message = "unreadable error answer: " + err.Error()
		}
		return apiErr
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("gateway %s %s: decode answer: %w", method, path, err)
	}
	return nil
}

// Open asks for a hole.
func (c *Client) Open(ctx context.Context, req Request) (Hole, error) {
	var out openResponse
	err := c.call(ctx, http.MethodPost, PathOpen, req, &out)
	return out.Hole, err
}

// Renew extends the leases of holes; leaseSeconds 0 is the gateway's default.
func (c *Client) Renew(ctx context.Context, holes []Target, leaseSeconds int) (RenewResult, error) {
	var out RenewResult
	err := c.call(ctx, http.MethodPost, PathRenew, renewRequest{Holes: holes, LeaseSeconds: leaseSeconds}, &out)
	return out, err
}

// Close closes holes.
func (c *Client) Close(ctx context.Context, holes []Target) (CloseResult, error) {
	var out CloseResult
	err := c.call(ctx, http.MethodPost, PathClose, closeRequest{Holes: holes}, &out)
	return out, err
}

// List returns the delegate's open holes.
func (c *Client) List(ctx context.Context) ([]Hole, error) {
	var out listResponse
	err := c.call(ctx, http.MethodGet, PathHoles, nil, &out)
	return out.Holes, err
}

// Sync makes the delegate's holes exactly holes (as far as the rules allow).
func (c *Client) Sync(ctx context.Context, holes []Request) (SyncResult, error) {
	var out SyncResult
	err := c.call(ctx, http.MethodPost, PathSync, syncRequest{Holes: holes}, &out)
	return out, err
}
