package main

import (
	"io"
	"log"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kpr-dev/kpr/test/loadgen/report"
)

// countingListener counts the connections the server accepted.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// TestGatedRate drives a rate client on loopback through warm, run and pause slices: it makes
// no connection while paused, and counts only what began in run slices, over their time.
func TestGatedRate(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &countingListener{Listener: inner}
	defer ln.Close()
	answer := make([]byte, Size)
	copy(answer, "gate-test\n")
	go acceptLoop(ln, answer, log.New(io.Discard, "", 0))

	cmds, in := io.Pipe()
	g := newGate()
	go g.follow(cmds)
	o := clientOpts{targets: []string{ln.Addr().String()}, timeout: 3 * time.Second}
	done := make(chan report.Run, 1)
	go func() { done <- rate("rate", o, g, 2) }()

	send := func(cmd string) {
		t.Helper()
		if _, err := io.WriteString(in, cmd+"\n"); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(50 * time.Millisecond)
	if n := ln.n.Load(); n != 0 {
		t.Fatalf("%d connections before the first command, want none", n)
	}
	send("warm")
	time.Sleep(100 * time.Millisecond)
	warm := ln.n.Load()
	if warm == 0 {
		t.Fatal("no connection during the warm-up slice")
	}
	send("pause")
	time.Sleep(30 * time.Millisecond) // requests in flight finish
	var counted int64
	for range 2 {
		before := ln.n.Load()
		time.Sleep(150 * time.Millisecond)
		if n := ln.n.Load() - before; n != 0 {
			t.Fatalf("%d connections while paused, want none", n)
		}
		send("run")
		time.Sleep(200 * time.Millisecond)
		send("pause")
		time.Sleep(30 * time.Millisecond)
		counted += ln.n.Load() - before
	}
	in.Close()
	var r report.Run
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the run did not end with its input")
	}
	if r.Slices != 2 {
		t.Errorf("slices %d, want 2", r.Slices)
	}
	if r.Seconds < 0.35 || r.Seconds > 0.6 {
		t.Errorf("counted %.3f s, want the two 200 ms run slices", r.Seconds)
	}
	if r.Failed != 0 || r.OK == 0 {
		t.Fatalf("ok %d failed %d (%v)", r.OK, r.Failed, r.Errors)
	}
	// What the server accepted in the run slices (and their in-flight ends) is what counted;
	// the warm-up's connections are not in it.
	if r.OK != counted {
		t.Errorf("counted %d requests, the server accepted %d in the run slices", r.OK, counted)
	}
	if r.PerSecond != float64(r.OK)/r.Seconds {
		t.Errorf("per second %.1f, want ok/seconds", r.PerSecond)
	}
}

func TestGateRejectsUnknownCommand(t *testing.T) {
	g := newGate()
	g.follow(strings.NewReader("warm\nfast\nrun\n"))
	if err := g.failure(); err == nil || !strings.Contains(err.Error(), `"fast"`) {
		t.Fatalf("failure %v, want one naming \"fast\"", err)
	}
	if _, ok := g.begin(); ok {
		t.Fatal("the run goes on after a bad command")
	}
}
