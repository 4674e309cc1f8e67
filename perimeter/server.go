package perimeter

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
)

// The API, HTTP/JSON over mTLS. The delegate is the client certificate's
// common name; every request acts on that delegate's holes only.
//
//	GET  /v1/holes                                    → {"holes": [Hole]}
//	POST /v1/holes/open  Request                      → 201 {"hole": Hole}
//	POST /v1/holes/renew {"holes": [Target], "lease_seconds": n} → RenewResult
//	POST /v1/holes/close {"holes": [Target]}          → CloseResult
//	POST /v1/holes/sync  {"holes": [Request]}         → SyncResult
//
// Errors are {"error": "...", "field": "...", "rule": "..."}: 400 for bad
// input (field names the value), 401 without a client certificate, 403 when
// the rules or a limit refuse (rule says which, empty when no allow rule
// matched), 409 for another delegate's hole, 500 when the kernel refused.
const (
	PathHoles = "/v1/holes"
	PathOpen  = "/v1/holes/open"
	PathRenew = "/v1/holes/renew"
	PathClose = "/v1/holes/close"
	PathSync  = "/v1/holes/sync"
)

// maxBody bounds a request: a sync of 20,000 holes fits.
const maxBody = 8 << 20

type (
	openResponse struct {
		Hole Hole `json:"hole"`
	}
	listResponse struct {
		Holes []Hole `json:"holes"`
	}
	renewRequest struct {
		Holes        []Target `json:"holes"`
		LeaseSeconds int      `json:"lease_seconds,omitempty"`
	}
	closeRequest struct {
		Holes []Target `json:"holes"`
	}
	syncRequest struct {
		Holes []Request `json:"holes"`
	}
	errorBody struct {
		Error string `json:"error"`
		Field string `json:"field,omitempty"`
		Rule  string `json:"rule,omitempty"`
	}
)

// Server serves the API for a Controller.
type Server struct {
	C   *Controller
	Log *slog.Logger
}

// Handler routes the API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+PathHoles, s.handle(func(delegate string, _ *http.Request) (int, any, error) {
		holes, err := s.C.List(delegate)
		return http.StatusOK, listResponse{Holes: holes}, err
	}))
	mux.HandleFunc("POST "+PathOpen, s.handle(func(delegate string, r *http.Request) (int, any, error) {
		var req Request
		if err := decode(r, &req); err != nil {
			return 0, nil, err
		}
		h, err := s.C.Open(delegate, req)
		return http.StatusCreated, openResponse{Hole: h}, err
	}))
	mux.HandleFunc("POST "+PathRenew, s.handle(func(delegate string, r *http.Request) (int, any, error) {
		var req renewRequest
		if err := decode(r, &req); err != nil {
			return 0, nil, err
		}
		res, err := s.C.Renew(delegate, req.Holes, req.LeaseSeconds)
		return http.StatusOK, res, err
	}))
	mux.HandleFunc("POST "+PathClose, s.handle(func(delegate string, r *http.Request) (int, any, error) {
		var req closeRequest
		if err := decode(r, &req); err != nil {
			return 0, nil, err
		}
		res, err := s.C.Close(delegate, req.Holes)
		return http.StatusOK, res, err
	}))
	mux.HandleFunc("POST "+PathSync, s.handle(func(delegate string, r *http.Request) (int, any, error) {
		var req syncRequest
		if err := decode(r, &req); err != nil {
			return 0, nil, err
		}
		res, err := s.C.Sync(delegate, req.Holes)
		return http.StatusOK, res, err
	}))
	return mux
}

// authError is a request whose client certificate does not name a delegate.
type authError struct {
	status int
	msg    string
}

func (e *authError) Error() string { return e.msg }

// delegateOf is the delegate a request comes from: its verified client
// certificate's common name.
func delegateOf(r *http.Request) (string, error) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return "", &authError{http.StatusUnauthorized, "a client certificate signed by the gateway's CA is required"}
	}
	name := r.TLS.VerifiedChains[0][0].Subject.CommonName
	if checkName("delegate", name) != nil {
		return "", &authError{http.StatusForbidden, fmt.Sprintf("client certificate name %q is not a usable delegate name (letters, digits and ._@+-)", name)}
	}
	return name, nil
}

func (s *Server) handle(fn func(delegate string, r *http.Request) (int, any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		delegate, err := delegateOf(r)
		status, body := 0, any(nil)
		if err == nil {
			status, body, err = fn(delegate, r)
		}
		if err != nil {
			status, body = errorResponse(err)
			level := slog.LevelInfo
			if status >= 500 {
				level = slog.LevelError
			}
			s.Log.Log(r.Context(), level, "api request failed", "delegate", delegate, "method", r.Method, "path", r.URL.Path, "status", status, "error", err.Error())
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		enc := json.NewEncoder(w)
		enc.SetEscapeHTML(false) // "->" in hole names stays readable
		_ = enc.Encode(body)     // the client is gone if this fails
	}
}

func errorResponse(err error) (int, errorBody) {
	var (
		fe   *FieldError
		ref  *Refusal
		conf *Conflict
		auth *authError
	)
	switch {
	case errors.As(err, &fe):
		return http.StatusBadRequest, errorBody{Error: fe.Error(), Field: fe.Field}
	case errors.As(err, &ref):
		return http.StatusForbidden, errorBody{Error: ref.Error(), Rule: ref.Rule}
	case errors.As(err, &conf):
		return http.StatusConflict, errorBody{Error: conf.Error()}
	case errors.As(err, &auth):
		return auth.status, errorBody{Error: auth.msg}
	}
	return http.StatusInternalServerError, errorBody{Error: err.Error()}
}

// decode reads one JSON value of the request's body into v, strictly:
// unknown fields, wrong types and trailing data are bad input naming the
// field where it can.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, maxBody))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil && dec.More() {
		err = errors.New("trailing data after the JSON object")
	}
	if err == nil {
		return nil
	}
	var (
		typ *json.UnmarshalTypeError
		syn *json.SyntaxError
		big *http.MaxBytesError
	)
	switch {
	case errors.As(err, &typ):
		return &FieldError{jsonPath(typ.Field), fmt.Sprintf("want a JSON %s, got %s", typ.Type, typ.Value)}
	case errors.As(err, &syn):
		return &FieldError{"body", fmt.Sprintf("invalid JSON at byte %d: %v", syn.Offset, err)}
	case errors.As(err, &big):
		return &FieldError{"body", fmt.Sprintf("larger than %d bytes", big.Limit)}
	case errors.Is(err, io.EOF):
		return &FieldError{"body", "empty; want a JSON object"}
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		return &FieldError{strings.Trim(name, `"`), "unknown field"}
	}
	return &FieldError{"body", err.Error()}
}

// jsonPath drops the names of embedded Go structs from a decoder's field
// path ("Target.port" is "port" on the wire).
func jsonPath(field string) string {
	var parts []string
	for _, p := range strings.Split(field, ".") {
		if p != "" && !(p[0] >= 'A' && p[0] <= 'Z') {
			parts = append(parts, p)
		}
	}
	return strings.Join(parts, ".")
}
