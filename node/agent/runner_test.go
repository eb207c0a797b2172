package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A burst of requests within minInterval produces one call, not one per request.
func TestRunnerCoalescesBursts(t *testing.T) {
	var calls atomic.Int32
	r := newRunner(func() error { calls.Add(1); return nil }, 200*time.Millisecond, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { r.Loop(ctx) })
	defer func() { cancel(); wg.Wait() }()

	r.Run()
	waitFor(t, func() bool { return calls.Load() == 1 })
	for range 100 {
		r.Run()
	}
	waitFor(t, func() bool { return calls.Load() == 2 })
	time.Sleep(400 * time.Millisecond)
	if n := calls.Load(); n != 2 {
		t.Fatalf("100 requests in a burst gave %d calls after the first, want 1", n-1)
	}
}

// Without requests the runner still calls at maxInterval (the periodic resync).
func TestRunnerRunsPeriodically(t *testing.T) {
	var calls atomic.Int32
	r := newRunner(func() error { calls.Add(1); return nil }, 0, 50*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { r.Loop(ctx) })
	defer func() { cancel(); wg.Wait() }()
	waitFor(t, func() bool { return calls.Load() >= 3 })
}

// A failing call is retried without waiting for maxInterval or a new request.
func TestRunnerRetriesFailures(t *testing.T) {
	var calls atomic.Int32
	r := newRunner(func() error {
		if calls.Add(1) < 3 {
			return errors.New("datapath busy")
		}
		return nil
	}, 10*time.Millisecond, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { r.Loop(ctx) })
	defer func() { cancel(); wg.Wait() }()
	r.Run()
	waitFor(t, func() bool { return calls.Load() == 3 })
}

// A call that had nothing to do yet (the initial lists not in) does not hold back the next
// one: the Run that comes with the lists is served at once, not after minInterval or a
// backoff.
func TestRunnerNotReadyDoesNotDelay(t *testing.T) {
	var calls atomic.Int32
	r := newRunner(func() error {
		if calls.Add(1) < 3 {
			return fmt.Errorf("caches: %w", errNotReady)
		}
		return nil
	}, time.Hour, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { r.Loop(ctx) })
	defer func() { cancel(); wg.Wait() }()
	for want := int32(1); want <= 3; want++ {
		r.Run()
		waitFor(t, func() bool { return calls.Load() == want })
	}
	// The one that did the work counts: the next waits for minInterval.
	r.Run()
	time.Sleep(100 * time.Millisecond)
	if n := calls.Load(); n != 3 {
		t.Fatalf("a request right after a real call was served at once (%d calls); minInterval not kept", n)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestTrackerCollectsTouchedServices(t *testing.T) {
	var kicks int
	tr := tracker{onChange: func() { kicks++ }}
	tr.touch("default/a")
	tr.touch("default/a")
	tr.touch("")
	tr.touch("kube-system/b")
	got, all := tr.take()
	if all || len(got) != 2 || kicks != 3 {
		t.Fatalf("take = %v, all %v, kicks %d", got, all, kicks)
	}
	if got, all := tr.take(); len(got) != 0 || all {
		t.Fatalf("second take = %v %v, want nothing", got, all)
	}
	tr.touchAll()
	if _, all := tr.take(); !all {
		t.Fatal("touchAll not reported")
	}
}

func TestProxySelectorMatchesKubeProxy(t *testing.T) {
	want := "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
	if got := proxySelector(); got != want {
		t.Fatalf("selector %q, want %q", got, want)
	}
}
