package main

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// applyLog passes the enforcer's log records on to the bench's handler
// and keeps the slowest "generation applied" record (a debug record with
// encode, clear, write and switch times), so that a slow reload can be
// taken apart in the report.
type applyLog struct {
	next slog.Handler
	mu   *sync.Mutex
	slow *slowApply
}

type slowApply struct {
	total time.Duration
	parts string
}

func newApplyLog(next slog.Handler) *applyLog {
	return &applyLog{next: next, mu: &sync.Mutex{}, slow: &slowApply{}}
}

func (h *applyLog) Enabled(ctx context.Context, l slog.Level) bool {
	return l == slog.LevelDebug || h.next.Enabled(ctx, l)
}

func (h *applyLog) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "generation applied" {
		var total time.Duration
		var parts []string
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "encode", "clear", "write", "switch":
				d := a.Value.Duration()
				total += d
				parts = append(parts, a.Key+" "+d.Round(time.Microsecond).String())
			case "rules":
				parts = append(parts, a.Value.String()+" rules")
			}
			return true
		})
		h.mu.Lock()
		if total > h.slow.total {
			h.slow.total, h.slow.parts = total, strings.Join(parts, ", ")
		}
		h.mu.Unlock()
	}
	if !h.next.Enabled(ctx, r.Level) {
		return nil
	}
	return h.next.Handle(ctx, r)
}

func (h *applyLog) WithAttrs(as []slog.Attr) slog.Handler {
	return &applyLog{next: h.next.WithAttrs(as), mu: h.mu, slow: h.slow}
}

func (h *applyLog) WithGroup(name string) slog.Handler {
	return &applyLog{next: h.next.WithGroup(name), mu: h.mu, slow: h.slow}
}

// takeSlowest returns the slowest Apply seen since the last call, in words.
func (h *applyLog) takeSlowest() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.slow.parts
	*h.slow = slowApply{}
	return s
}
