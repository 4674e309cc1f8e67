package perimeter

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Window is a weekly time window: on each of Days, from Start to End
// (minutes after midnight, in Loc). An End at or before Start is an
// overnight window that ends on the next day; the day named is the day it
// starts.
type Window struct {
	Days       [7]bool // indexed by time.Weekday
	Start, End int
	Loc        *time.Location
}

var dayNames = map[string]time.Weekday{
	"sun": time.Sunday, "mon": time.Monday, "tue": time.Tuesday, "wed": time.Wednesday,
	"thu": time.Thursday, "fri": time.Friday, "sat": time.Saturday,
}

// parseDays reads "*", "daily", or a comma list of days and day ranges
// ("Mon-Fri,Sun"; "Fri-Mon" wraps over the weekend). Names are the first
// three letters, in any case.
func parseDays(s string) ([7]bool, error) {
	var days [7]bool
	if s == "*" || s == "any" || s == "daily" {
		for i := range days {
			days[i] = true
		}
		return days, nil
	}
	for _, item := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(item, "-")
		from, ok := dayNames[strings.ToLower(lo)]
		if !ok {
			return days, fmt.Errorf("expected a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun), a range such as Mon-Fri, or *, got %q", item)
		}
		to := from
		if isRange {
			if to, ok = dayNames[strings.ToLower(hi)]; !ok {
				return days, fmt.Errorf("expected a day after %q-, got %q", lo, hi)
			}
		}
		for d := from; ; d = (d + 1) % 7 {
			days[d] = true
			if d == to {
				break
			}
		}
	}
	return days, nil
}

// parseClock reads HH:MM, 00:00 to 24:00, as minutes after midnight.
func parseClock(s string) (int, error) {
	h, m, ok := strings.Cut(s, ":")
	hh, err1 := strconv.Atoi(h)
	mm, err2 := strconv.Atoi(m)
	if !ok || len(h) != 2 || len(m) != 2 || err1 != nil || err2 != nil || hh > 24 || mm > 59 || (hh == 24 && mm != 0) {
		return 0, fmt.Errorf("expected a time of day HH:MM (00:00 to 24:00), got %q", s)
	}
	return hh*60 + mm, nil
}

// parseSpan reads HH:MM-HH:MM.
func parseSpan(s string) (start, end int, err error) {
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		return 0, 0, fmt.Errorf("expected a span HH:MM-HH:MM, got %q", s)
	}
	if start, err = parseClock(a); err != nil {
		return 0, 0, err
	}
	if end, err = parseClock(b); err != nil {
		return 0, 0, err
	}
	if start == 24*60 {
		return 0, 0, fmt.Errorf("a window cannot start at 24:00; write 00:00 of the next day")
	}
	if start == end {
		return 0, 0, fmt.Errorf("span %q is empty; for the whole day write 00:00-24:00", s)
	}
	return start, end, nil
}

func (w *Window) overnight() bool { return w.End <= w.Start }

// Contains reports whether t falls inside the window.
func (w *Window) Contains(t time.Time) bool {
	t = t.In(w.Loc)
	min := t.Hour()*60 + t.Minute()
	today := t.Weekday()
	if !w.overnight() {
		return w.Days[today] && w.Start <= min && min < w.End
	}
	yesterday := (today + 6) % 7
	return (w.Days[today] && min >= w.Start) || (w.Days[yesterday] && min < w.End)
}

// Until returns when the occurrence of the window that contains t ends; t
// must be inside the window.
func (w *Window) Until(t time.Time) time.Time {
	t = t.In(w.Loc)
	y, m, d := t.Date()
	if w.overnight() && t.Hour()*60+t.Minute() >= w.Start {
		d++ // started today, ends tomorrow
	}
	// time.Date normalizes 24:00 and day overflow, and resolves DST.
	return time.Date(y, m, d, w.End/60, w.End%60, 0, 0, w.Loc)
}

func (w *Window) String() string {
	var days []string
	all := true
	for d := time.Sunday; d <= time.Saturday; d++ {
		if w.Days[d] {
			days = append(days, d.String()[:3])
		} else {
			all = false
		}
	}
	ds := strings.Join(days, ",")
	if all {
		ds = "*"
	}
	clock := func(m int) string { return fmt.Sprintf("%02d:%02d", m/60, m%60) }
	return "at " + ds + " " + clock(w.Start) + "-" + clock(w.End) + " " + w.Loc.String()
}
