package agent

import (
	"context"
	"time"
)

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
		last = time.Now()
		next := r.maxInterval
		if err := r.fn(); err != nil {
			backoff = min(max(2*backoff, r.minInterval, 100*time.Millisecond), r.maxInterval)
			next = backoff
		} else {
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
