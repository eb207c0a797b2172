package main

import (
	"bufio"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
)

// window decides, before each request, whether a client goes on and whether the request
// counts, and afterwards whether it still counts.
type window interface {
	// begin blocks while the client is paused; ok is false once the run is over.
	begin() (counted, ok bool)
	// keep reports whether a request that began counted and ended at t1 counts.
	keep(t1 time.Time) bool
	// seconds is the time the counted requests were measured over.
	seconds() float64
	// series is the number of whole seconds the run reports a per-second series for.
	series() int
	// second is the series index of a request that ended at t1 (may be out of range).
	second(t1 time.Time) int
}

// timed is the window of a run on its own: a warm-up, then duration counted.
type timed struct{ from, end time.Time }

func newTimed(o clientOpts) timed {
	from := time.Now().Add(o.warmup)
	return timed{from: from, end: from.Add(o.duration)}
}

func (w timed) begin() (bool, bool) {
	now := time.Now()
	return !now.Before(w.from), now.Before(w.end)
}
func (w timed) keep(t1 time.Time) bool  { return !t1.After(w.end) }
func (w timed) seconds() float64        { return w.end.Sub(w.from).Seconds() }
func (w timed) series() int             { return int(w.end.Sub(w.from) / time.Second) }
func (w timed) second(t1 time.Time) int { return int(t1.Sub(w.from) / time.Second) }

// gate is the window of a run driven by another process in slices (--gate): it reads one
// command per line from its input,
//
//	warm   run, not counted (warm-up)
//	run    run, counted
//	pause  start no request until the next command
//
// and the run ends at the end of the input. A request counts when it began during a run
// slice; the time counted is the time between each run command and the command after it, as
// this process saw them. A request in flight when a slice ends finishes (and counts) during
// the pause: every slice gains about the same at its end, so two clients alternated this way
// compare fairly.
type gate struct {
	mu      sync.Mutex
	phase   string        // "pause", "warm" or "run"
	open    chan struct{} // closed while not paused
	over    bool
	since   time.Time     // when the current run slice began
	counted time.Duration // the run slices that ended
	slices  int           // run slices begun
	err     error         // a command it did not understand
}

func newGate() *gate {
	return &gate{phase: "pause", open: make(chan struct{})}
}

// follow applies the commands read from r until its end, then ends the run.
func (g *gate) follow(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if err := g.set(strings.TrimSpace(sc.Text()), time.Now()); err != nil {
			g.mu.Lock()
			g.err = err
			g.mu.Unlock()
			break
		}
	}
	g.end(time.Now())
}

// set switches to phase at now.
func (g *gate) set(phase string, now time.Time) error {
	switch phase {
	case "warm", "run", "pause":
	case "":
		return nil
	default:
		return fmt.Errorf("gate: unknown command %q (want warm, run or pause)", phase)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.over {
		return nil
	}
	if g.phase == "run" {
		g.counted += now.Sub(g.since)
	}
	if phase == "run" {
		g.since = now
		g.slices++
	}
	wasPaused := g.phase == "pause"
	g.phase = phase
	switch {
	case wasPaused && phase != "pause":
		close(g.open)
	case !wasPaused && phase == "pause":
		g.open = make(chan struct{})
	}
	return nil
}

// end ends the run at now: waiting clients return.
func (g *gate) end(now time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.over {
		return
	}
	if g.phase == "run" {
		g.counted += now.Sub(g.since)
	}
	if g.phase == "pause" {
		close(g.open)
	}
	g.over = true
}

func (g *gate) begin() (bool, bool) {
	for {
		g.mu.Lock()
		phase, open, over := g.phase, g.open, g.over
		g.mu.Unlock()
		if over {
			return false, false
		}
		if phase != "pause" {
			return phase == "run", true
		}
		<-open
	}
}

func (g *gate) keep(time.Time) bool { return true }

func (g *gate) seconds() float64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.counted.Seconds()
}

func (g *gate) series() int          { return 0 }
func (g *gate) second(time.Time) int { return -1 }

// slicesOf is the number of run slices of a gated window, 0 for a timed one.
func slicesOf(w window) int {
	g, ok := w.(*gate)
	if !ok {
		return 0
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.slices
}

func (g *gate) failure() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.err
}
