package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// Size is the length of every request and answer.
const Size = 64

// Request kinds (the first byte of a request).
const (
	kindClose     = 'C' // answer, then close
	kindKeepAlive = 'K' // answer, then wait for the next request
)

// idleTimeout closes connections that send nothing, so a vanished client cannot pin a goroutine.
const idleTimeout = 30 * time.Second

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	name := fs.String("name", "", "name to answer with (one word, at most 32 bytes)")
	port := fs.Int("port", 8080, "TCP port")
	fs.Parse(args)
	if *name == "" || len(*name) > 32 || strings.ContainsAny(*name, " \n") {
		return fmt.Errorf("--name %q: want one word of at most 32 bytes", *name)
	}
	if *port < 1 || *port > 65535 {
		return fmt.Errorf("--port %d: want 1..65535", *port)
	}
	answer := make([]byte, Size)
	copy(answer, fmt.Sprintf("%-*s\n", Size-1, *name))
	logger := log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds)

	ln, err := net.Listen("tcp", fmt.Sprintf(":%d", *port))
	if err != nil {
		return err
	}
	defer ln.Close()
	go acceptLoop(ln, answer, logger)
	logger.Printf("loadgen serve %s: tcp %d", *name, *port)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	s := <-sig
	logger.Printf("loadgen serve %s: %v, exiting", *name, s)
	return nil
}

func acceptLoop(ln net.Listener, answer []byte, logger *log.Logger) {
	var lastLog time.Time
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Logged at most once a second: a benchmark must not spend its time writing logs.
			if time.Since(lastLog) > time.Second {
				logger.Printf("accept: %v", err)
				lastLog = time.Now()
			}
			time.Sleep(time.Millisecond)
			continue
		}
		go handle(c, answer)
	}
}

func handle(c net.Conn, answer []byte) {
	defer c.Close()
	req := make([]byte, Size)
	for {
		c.SetReadDeadline(time.Now().Add(idleTimeout))
		if _, err := io.ReadFull(c, req); err != nil {
			return
		}
		if _, err := c.Write(answer); err != nil {
			return
		}
		if req[0] != kindKeepAlive {
			return
		}
	}
}
