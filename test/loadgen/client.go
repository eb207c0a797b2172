package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kpr-dev/kpr/test/loadgen/report"
)

// Bounds on the flags, so a typo cannot start an endless or enormous run.
const (
	maxWorkers  = 256
	maxDuration = 10 * time.Minute
	// maxInFlight bounds the attempts first has outstanding at once.
	maxInFlight = 64
	// maxErrorClasses bounds the distinct error strings kept per run.
	maxErrorClasses = 32
)

type clientOpts struct {
	targets        []string
	random         bool // pick a target at random for each connection, not in turn
	workers        int
	warmup         time.Duration
	duration       time.Duration
	timeout        time.Duration
	interval       time.Duration
	attemptTimeout time.Duration
	// gate, when set, drives the run instead of warmup and duration (--gate).
	gate *gate
}

func client(mode string, args []string) error {
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	var o clientOpts
	targets := fs.String("targets", "", "comma-separated IP:PORT list, used in turn")
	pick := fs.String("pick", "turn", "how each connection picks its target: turn (round robin) or random (as kube-proxy and kpr pick backends)")
	fs.IntVar(&o.workers, "workers", 8, "concurrent workers (rate)")
	fs.DurationVar(&o.warmup, "warmup", 2*time.Second, "time before measuring starts")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "measured time")
	fs.DurationVar(&o.timeout, "timeout", 3*time.Second, "per request (rate, fresh, established); overall (first)")
	fs.DurationVar(&o.interval, "interval", 10*time.Millisecond, "time between attempts (first)")
	fs.DurationVar(&o.attemptTimeout, "attempt-timeout", 200*time.Millisecond, "per attempt (first)")
	gated := fs.Bool("gate", false, "run in slices that commands on stdin start and stop (warm, run, pause; the end of input ends the run) instead of --warmup and --duration (rate, fresh, established)")
	fs.Parse(args)
	for _, t := range strings.Split(*targets, ",") {
		if t = strings.TrimSpace(t); t == "" {
			continue
		}
		if _, err := checkTarget(t); err != nil {
			return fmt.Errorf("--targets: %w", err)
		}
		o.targets = append(o.targets, t)
	}
	if len(o.targets) == 0 {
		return errors.New("--targets: none given")
	}
	switch *pick {
	case "turn":
	case "random":
		o.random = true
	default:
		return fmt.Errorf("--pick %q: want turn or random", *pick)
	}
	if o.workers < 1 || o.workers > maxWorkers {
		return fmt.Errorf("--workers %d: want 1..%d", o.workers, maxWorkers)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"warmup", o.warmup}, {"duration", o.duration}, {"timeout", o.timeout}, {"interval", o.interval}, {"attempt-timeout", o.attemptTimeout}} {
		if d.v < 0 || d.v > maxDuration || (d.v == 0 && d.name != "warmup") {
			return fmt.Errorf("--%s %v: want 0..%v (only warmup may be 0)", d.name, d.v, maxDuration)
		}
	}
	var w window
	if *gated {
		if mode == "first" {
			return errors.New("--gate: not for first")
		}
		g := newGate()
		go g.follow(os.Stdin)
		o.gate, w = g, g
	} else {
		w = newTimed(o)
	}
	var r report.Run
	switch mode {
	case "rate":
		r = rate("rate", o, w, o.workers)
	case "fresh":
		r = rate("fresh", o, w, 1)
	case "established":
		r = established(o, w)
	case "first":
		r = first(o)
	}
	if o.gate != nil {
		if err := o.gate.failure(); err != nil {
			return err
		}
	}
	return json.NewEncoder(os.Stdout).Encode(r)
}

// checkTarget checks an IP:PORT literal; names are not resolved inside a namespace.
func checkTarget(s string) (*net.TCPAddr, error) {
	host, _, err := net.SplitHostPort(s)
	if err != nil {
		return nil, err
	}
	if net.ParseIP(host) == nil {
		return nil, fmt.Errorf("%q: want an IP literal", s)
	}
	return net.ResolveTCPAddr("tcp", s)
}

// tally is one worker's share of a run.
type tally struct {
	ok, failed int64
	series     []int64 // OK per second of the window
	errors     map[string]int64
	samples    []time.Duration
	backends   map[string]int64
}

func newTally() *tally {
	return &tally{errors: map[string]int64{}, backends: map[string]int64{}}
}

func (t *tally) fail(err error) {
	t.failed++
	c := classify(err)
	if _, ok := t.errors[c]; ok || len(t.errors) < maxErrorClasses {
		t.errors[c]++
	} else {
		t.errors["other"]++
	}
}

func merge(mode string, o clientOpts, workers int, seconds float64, ts []*tally) report.Run {
	r := report.Run{Mode: mode, Targets: o.targets, Workers: workers, Seconds: seconds,
		Errors: map[string]int64{}, Backends: map[string]int64{}}
	var all []time.Duration
	for _, t := range ts {
		r.OK += t.ok
		r.Failed += t.failed
		for k, v := range t.errors {
			r.Errors[k] += v
		}
		for k, v := range t.backends {
			r.Backends[k] += v
		}
		all = append(all, t.samples...)
	}
	if seconds > 0 {
		r.PerSecond = float64(r.OK) / seconds
	}
	r.Latency = report.Summarize(all)
	return r
}

// rate runs workers that each open a new connection per request until the window ends. Only
// requests that the window counts (timed: started after the warm-up and finished inside the
// window; gated: started in a run slice) count.
func rate(mode string, o clientOpts, w window, workers int) report.Run {
	seconds := w.series()
	ts := make([]*tally, workers)
	var wg sync.WaitGroup
	for n := range workers {
		t := newTally()
		t.series = make([]int64, seconds)
		ts[n] = t
		wg.Go(func() {
			req := request(kindClose)
			answer := make([]byte, Size)
			pick := o.picker(n)
			for i := n; ; i++ {
				counted, ok := w.begin()
				if !ok {
					return
				}
				t0 := time.Now()
				name, err := once(pick(i), req, answer, t0.Add(o.timeout))
				t1 := time.Now()
				if !counted || !w.keep(t1) {
					continue
				}
				if err != nil {
					t.fail(err)
					continue
				}
				t.ok++
				t.samples = append(t.samples, t1.Sub(t0))
				t.backends[name]++
				if sec := w.second(t1); sec >= 0 && sec < len(t.series) {
					t.series[sec]++
				}
			}
		})
	}
	wg.Wait()
	r := merge(mode, o, workers, w.seconds(), ts)
	r.Slices = slicesOf(w)
	if mode == "rate" && seconds > 0 {
		r.PerSecondSeries = make([]int64, seconds)
		for _, t := range ts {
			for i, n := range t.series {
				r.PerSecondSeries[i] += n
			}
		}
	}
	return r
}

// once is one request on a new connection: connect, request, answer, then wait for the
// server's FIN and close. The latency the caller measures includes the FIN wait, which arrives
// with or right after the answer.
func once(target string, req, answer []byte, deadline time.Time) (string, error) {
	d := net.Dialer{Deadline: deadline, KeepAlive: -1}
	c, err := d.Dial("tcp", target)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(deadline)
	if _, err := c.Write(req); err != nil {
		return "", err
	}
	if _, err := io.ReadFull(c, answer); err != nil {
		return "", fmt.Errorf("answer: %w", err)
	}
	if n, err := c.Read(answer[:1]); n != 0 || !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("want the server to close after its answer, got %d bytes, %v", n, err)
	}
	return name(answer), nil
}

// established sends requests back to back on one connection (reconnecting after an error).
func established(o clientOpts, w window) report.Run {
	t := newTally()
	req := request(kindKeepAlive)
	answer := make([]byte, Size)
	var c net.Conn
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	pick := o.picker(0)
	for i := 0; ; i++ {
		counted, ok := w.begin()
		if !ok {
			break
		}
		t0 := time.Now()
		err := func() error {
			if c == nil {
				d := net.Dialer{Deadline: t0.Add(o.timeout), KeepAlive: -1}
				var err error
				if c, err = d.Dial("tcp", pick(i)); err != nil {
					c = nil
					return err
				}
			}
			c.SetDeadline(t0.Add(o.timeout))
			if _, err := c.Write(req); err != nil {
				return err
			}
			_, err := io.ReadFull(c, answer)
			return err
		}()
		t1 := time.Now()
		if err != nil && c != nil {
			c.Close()
			c = nil
		}
		if !counted || !w.keep(t1) {
			continue
		}
		if err != nil {
			t.fail(err)
			continue
		}
		t.ok++
		t.samples = append(t.samples, t1.Sub(t0))
		t.backends[name(answer)]++
	}
	r := merge("established", o, 1, w.seconds(), []*tally{t})
	r.Slices = slicesOf(w)
	return r
}

// first starts an attempt (new connection, one request) every interval, several in flight, and
// reports the wall-clock time at which the first one was answered.
func first(o clientOpts) report.Run {
	start := time.Now()
	deadline := start.Add(o.timeout)
	fmt.Println("polling")
	type result struct {
		at   time.Time
		name string
	}
	won := make(chan result, 1)
	sem := make(chan struct{}, maxInFlight)
	var attempts int64
	tick := time.NewTicker(o.interval)
	defer tick.Stop()
	t := newTally()
	var mu sync.Mutex
	for {
		select {
		case r := <-won:
			mu.Lock()
			defer mu.Unlock()
			out := merge("first", o, 1, r.at.Sub(start).Seconds(), []*tally{t})
			out.OK = 1
			out.FirstOKUnixNano = r.at.UnixNano()
			out.Attempts = attempts
			out.Backends = map[string]int64{r.name: 1}
			return out
		case now := <-tick.C:
			if now.After(deadline) {
				mu.Lock()
				defer mu.Unlock()
				out := merge("first", o, 1, now.Sub(start).Seconds(), []*tally{t})
				out.Attempts = attempts
				return out
			}
			select {
			case sem <- struct{}{}:
			default:
				continue // maxInFlight attempts are waiting already
			}
			attempts++
			target := o.targets[int(attempts)%len(o.targets)]
			go func() {
				defer func() { <-sem }()
				answer := make([]byte, Size)
				n, err := once(target, request(kindClose), answer, time.Now().Add(o.attemptTimeout))
				if err != nil {
					mu.Lock()
					t.fail(err)
					mu.Unlock()
					return
				}
				select {
				case won <- result{time.Now(), n}:
				default:
				}
			}()
		}
	}
}

// picker returns worker w's choice of target for its i-th connection.
func (o clientOpts) picker(w int) func(i int) string {
	if !o.random {
		return func(i int) string { return o.targets[i%len(o.targets)] }
	}
	r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(w)))
	return func(int) string { return o.targets[r.IntN(len(o.targets))] }
}

func request(kind byte) []byte {
	req := bytes.Repeat([]byte{'.'}, Size)
	req[0] = kind
	req[Size-1] = '\n'
	return req
}

func name(answer []byte) string {
	return strings.TrimSpace(string(answer))
}

// classify names an error by its errno when there is one (ECONNREFUSED, ETIMEDOUT, ...).
func classify(err error) string {
	var errno syscall.Errno
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return "timeout"
	case errors.As(err, &errno):
		return unix.ErrnoName(errno)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed before the answer"
	}
	s := err.Error()
	if len(s) > 80 {
		s = s[:80]
	}
	return s
}
