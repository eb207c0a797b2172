// Package report is what the loadgen client prints (one JSON object per run) and what the
// benchmark reads back, plus the percentile arithmetic both sides share.
package report

import (
	"math"
	"slices"
	"time"
)

// Run is the result of one loadgen client run.
type Run struct {
	// Mode is rate (N workers, a new connection per request), fresh (one worker, a new
	// connection per request), established (one connection, requests back to back) or first
	// (poll until the first answer).
	Mode    string   `json:"mode"`
	Targets []string `json:"targets"`
	Workers int      `json:"workers"`
	// Seconds is the measured window (after the warm-up).
	Seconds float64 `json:"seconds"`
	// OK and Failed count requests that completed inside the window. A failed request is any
	// connect, write or read error, a short answer, or a timeout.
	OK     int64            `json:"ok"`
	Failed int64            `json:"failed"`
	Errors map[string]int64 `json:"errors,omitempty"` // error class -> count
	// PerSecond is OK / Seconds.
	PerSecond float64 `json:"per_second"`
	// Latency of the successful requests in the window: connect + request + answer for rate
	// and fresh, request + answer for established.
	Latency Latency `json:"latency"`
	// PerSecondSeries is OK per second of the window (rate only), to show how steady it was.
	PerSecondSeries []int64 `json:"per_second_series,omitempty"`
	// Backends counts answers per server name: shows the load was spread.
	Backends map[string]int64 `json:"backends,omitempty"`

	// First mode: wall-clock time (Unix ns) when the first attempt succeeded, or 0.
	FirstOKUnixNano int64 `json:"first_ok_unix_nano,omitempty"`
	Attempts        int64 `json:"attempts,omitempty"`

	// Slices is the number of run slices of a gated run (--gate); Seconds is their sum.
	Slices int `json:"slices,omitempty"`
}

// Latency summarises samples in microseconds.
type Latency struct {
	N    int     `json:"n"`
	Mean float64 `json:"mean_us"`
	P50  float64 `json:"p50_us"`
	P90  float64 `json:"p90_us"`
	P99  float64 `json:"p99_us"`
	P999 float64 `json:"p999_us"`
	Max  float64 `json:"max_us"`
}

// Summarize sorts samples in place and returns their percentiles.
func Summarize(samples []time.Duration) Latency {
	if len(samples) == 0 {
		return Latency{}
	}
	slices.Sort(samples)
	var sum time.Duration
	for _, s := range samples {
		sum += s
	}
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
	return Latency{
		N:    len(samples),
		Mean: us(sum) / float64(len(samples)),
		P50:  us(Percentile(samples, 0.50)),
		P90:  us(Percentile(samples, 0.90)),
		P99:  us(Percentile(samples, 0.99)),
		P999: us(Percentile(samples, 0.999)),
		Max:  us(samples[len(samples)-1]),
	}
}

// Percentile returns the nearest-rank q-quantile (0 < q <= 1) of sorted samples.
func Percentile[T any](sorted []T, q float64) T {
	var zero T
	if len(sorted) == 0 {
		return zero
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}
