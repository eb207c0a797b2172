package agent

import (
	"context"
	"errors"
	"time"
)

// errNotReady from fn means it did nothing because its input is not there yet (the informers'
// initial lists): the call does not count as one for minInterval or the backoff, and the
// runner waits for the Run that the input's arrival brings. Without this, requests arriving
// during the initial lists would each fail and push the first real sync back by a growing
// backoff, or by minInterval (a second by default), after the lists are in.
var errNotReady = errors.New("not ready")

// runner calls fn when asked, at most once per minInterval (bursts of requests coalesce into
// one call), and at least once per maxInterval, like kube-proxy's bounded-frequency runner.
// After a failure it retries with backoff up to maxInterval.
type runner struct {
	fn          func() error
	minInterval time.Duration
	maxInterval time.Duration
	kick        chan struct{}
}

func newRunner(fn func() error, minInterval, maxInterval time.Duration) *runner {
	return &runner{fn: fn, minInterval: minInterval, maxInterval: maxInterval, kick: make(chan struct{}, 1)}
}

// Run asks for a call soon; it never blocks.
func (r *runner) Run() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Loop calls fn until ctx is done.
func (r *runner) Loop(ctx context.Context) {
	var last time.Time
	backoff := time.Duration(0)
	timer := time.NewTimer(r.maxInterval)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
		case <-timer.C:
		}
		if wait := r.minInterval - time.Since(last); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			// Requests that arrived while waiting are served by this call.
			select {
			case <-r.kick:
			default:
			}
		}
		started := time.Now()
		next := r.maxInterval
		switch err := r.fn(); {
		case errors.Is(err, errNotReady):
		case err != nil:
			last = started
			backoff = min(max(2*backoff, r.minInterval, 100*time.Millisecond), r.maxInterval)
			next = backoff
		default:
			last = started
			backoff = 0
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(next)
	}
}
