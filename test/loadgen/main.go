// Command loadgen is the traffic tool of `make bench`: a small request/response server and the
// clients that measure new connections per second and request latency, run inside sandbox
// namespaces.
//
//	loadgen serve --name NAME [--port 8080]
//	loadgen rate        --targets IP:PORT[,IP:PORT...] [--workers 8] [--warmup 2s] [--duration 10s]
//	loadgen fresh       --targets ... [--warmup 1s] [--duration 5s]
//	loadgen established --targets ... [--warmup 1s] [--duration 5s]
//	loadgen rate|fresh|established --gate --targets ...   (slices driven through stdin; see gate)
//	loadgen first       --targets IP:PORT [--timeout 3m] [--interval 10ms] [--attempt-timeout 200ms]
//
// The protocol is fixed-size messages (Size bytes). A request starting with 'C' gets one answer
// and then the server closes the connection (the server closes first, so the client keeps no
// TIME_WAIT and cannot run out of ephemeral ports at high rates); 'K' keeps it open for the next
// request. The answer carries the server's name, padded.
//
// rate runs N workers, each opening a new connection per request (connect, request, answer,
// close) with targets taken in turn; fresh does the same with one worker, for latency; established
// sends requests back to back on one connection; first polls with a new connection every interval
// until one is answered and reports when. Each prints one JSON object (report.Run); first also
// prints "polling" once it has started.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "rate", "fresh", "established", "first":
		err = client(os.Args[1], os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "loadgen %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: loadgen serve|rate|fresh|established|first [flags] (loadgen <command> -h for flags)")
	os.Exit(2)
}
