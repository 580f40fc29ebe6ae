// go-worker: the benchmark's Go peer (scripts/bench.sh), a JetStream queue-worker written the
// way the OpenFaaS one is documented: one pull subscription on the durable consumer, Fetch of as
// many messages as there are free slots, a goroutine per message, in-progress acks while the
// function runs, a keep-alive http.Client, an ack when the call is done. It sends no callbacks
// (the benchmark queues none) and reads the response only to discard it.
//
// It reads queue-worker's environment (nats_url or nats_host/nats_port, queue_name, nats_stream,
// nats_durable, nats_stream_storage, nats_stream_replicas, gateway_url, max_inflight,
// max_ack_pending, ack_wait, upstream_timeout, drain_timeout, metrics_port, retry_http_codes,
// max_retry_attempts, initial_retry_wait, max_retry_wait) and finds or creates the stream and the
// durable consumer as queue-worker does (src/broker/provision.rs). Logs one JSON line a call.
// Built in GOPATH mode against Debian's golang-github-nats-io-go-nats-dev (1.22):
//
//	GO111MODULE=off GOPROXY=off GOPATH=$PWD/target/go:/usr/share/gocode \
//	    go build -o target/go/bin/go-worker ./scripts/bench/go-worker
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
)

// QueueRequest is faas-provider's types.QueueRequest as the gateway encodes it.
type QueueRequest struct {
	Header      http.Header `json:"Header"`
	Body        []byte      `json:"Body"` // base64 in the JSON
	Method      string      `json:"Method"`
	Path        string      `json:"Path"`
	QueryString string      `json:"QueryString"`
	Function    string      `json:"Function"`
}

type config struct {
	natsURL, queue, stream, durable, gateway         string
	inflight, ackPending, attempts, port, replicas   int
	memory                                           bool
	ackWait, timeout, drain, retryWait, maxRetryWait time.Duration
	retryCodes                                       map[int]bool
}

func env(name, def string) string {
	if v := strings.TrimSpace(os.Getenv(name)); v != "" {
		return v
	}
	return def
}

func envInt(name string, def, min int) int {
	n, err := strconv.Atoi(env(name, strconv.Itoa(def)))
	if err != nil || n < min {
		log.Fatalf("go-worker: %s: expected a whole number >= %d", name, min)
	}
	return n
}

func envDuration(name string, def time.Duration) time.Duration {
	d, err := time.ParseDuration(env(name, def.String()))
	if err != nil || d < 0 {
		log.Fatalf("go-worker: %s: expected a duration such as 30s", name)
	}
	return d
}

func loadConfig() config {
	c := config{natsURL: env("nats_url", "nats://"+env("nats_host", "127.0.0.1")+":"+env("nats_port", "4222")),
		queue: env("queue_name", "faas-request"), durable: env("nats_durable", "faas-workers"),
		gateway: strings.TrimRight(env("gateway_url", "http://127.0.0.1:8080"), "/"),
		memory:  env("nats_stream_storage", "file") == "memory", retryCodes: map[int]bool{}}
	// queue-worker's default stream name: OF_<queue> with . * > made _.
	c.stream = env("nats_stream", "OF_"+strings.NewReplacer(".", "_", "*", "_", ">", "_").Replace(c.queue))
	c.inflight, c.ackPending = envInt("max_inflight", 50, 1), envInt("max_ack_pending", 1000, 1)
	if c.ackPending < c.inflight {
		c.ackPending = c.inflight // as queue-worker raises the default
	}
	c.replicas, c.attempts = envInt("nats_stream_replicas", 1, 1), envInt("max_retry_attempts", 100, 1)
	c.port = envInt("metrics_port", 8081, 0)
	c.ackWait, c.timeout = envDuration("ack_wait", time.Minute), envDuration("upstream_timeout", time.Minute)
	c.drain = envDuration("drain_timeout", c.timeout+30*time.Second)
	c.retryWait = envDuration("initial_retry_wait", 10*time.Second)
	c.maxRetryWait = envDuration("max_retry_wait", 2*time.Minute)
	for _, s := range strings.Split(env("retry_http_codes", "408,429,500,502,503,504"), ",") {
		if code, err := strconv.Atoi(strings.TrimSpace(s)); err == nil {
			c.retryCodes[code] = true
		}
	}
	return c
}

// covers reports whether the subject pattern p matches every subject in s (a subject, or a
// pattern ending in ">").
func covers(p, s string) bool {
	pt, st := strings.Split(p, "."), strings.Split(s, ".")
	for i, t := range pt {
		if t == ">" {
			return i < len(st)
		}
		if i >= len(st) || (t != "*" && t != st[i]) || (t == "*" && st[i] == ">") {
			return false
		}
	}
	return len(pt) == len(st)
}

// ensureQueue finds the stream that captures the queue Q (whatever its name) or creates
// nats_stream / OF_<Q> on Q and Q.> (work-queue retention), then the durable pull consumer with
// queue-worker's settings: deliver all, explicit acks, ack_wait, unlimited deliveries, replay
// instant, max_waiting max(2 x max_inflight, 512), max_ack_pending, and no filter unless the
// stream holds subjects outside the queue (then Q). Returns the stream and the subject to
// subscribe with (the consumer's filter, or Q).
func ensureQueue(nc *nats.Conn, js nats.JetStreamContext, c config) (string, string, error) {
	var info *nats.StreamInfo
	for _, filter := range []string{c.queue, c.queue + ".>"} {
		req, _ := json.Marshal(map[string]string{"subject": filter})
		resp, err := nc.Request("$JS.API.STREAM.NAMES", req, 5*time.Second)
		if err != nil {
			return "", "", fmt.Errorf("listing the streams on %s: %w", filter, err)
		}
		var names struct{ Streams []string }
		json.Unmarshal(resp.Data, &names)
		for _, name := range names.Streams {
			if si, err := js.StreamInfo(name); err == nil && info == nil {
				for _, p := range si.Config.Subjects {
					if covers(p, c.queue) {
						info = si
					}
				}
			}
		}
	}
	if info == nil {
		storage := nats.FileStorage
		if c.memory {
			storage = nats.MemoryStorage
		}
		var err error
		info, err = js.AddStream(&nats.StreamConfig{Name: c.stream, Subjects: []string{c.queue, c.queue + ".>"},
			Retention: nats.WorkQueuePolicy, Storage: storage, Replicas: c.replicas})
		if err != nil {
			return "", "", fmt.Errorf("creating stream %s: %w", c.stream, err)
		}
	}
	stream, filter := info.Config.Name, ""
	for _, p := range info.Config.Subjects {
		if !covers(c.queue, p) && !covers(c.queue+".>", p) {
			filter = c.queue // the stream holds more than the queue
		}
	}
	if ci, err := js.ConsumerInfo(stream, c.durable); err == nil {
		if ci.Config.FilterSubject != "" {
			return stream, ci.Config.FilterSubject, nil
		}
		return stream, c.queue, nil
	} else if err != nats.ErrConsumerNotFound {
		return "", "", fmt.Errorf("reading consumer %s/%s: %w", stream, c.durable, err)
	}
	maxWaiting := 2 * c.inflight
	if maxWaiting < 512 {
		maxWaiting = 512
	}
	_, err := js.AddConsumer(stream, &nats.ConsumerConfig{Durable: c.durable,
		DeliverPolicy: nats.DeliverAllPolicy, AckPolicy: nats.AckExplicitPolicy, AckWait: c.ackWait,
		FilterSubject: filter, ReplayPolicy: nats.ReplayInstantPolicy, MaxWaiting: maxWaiting,
		MaxAckPending: c.ackPending})
	if err != nil {
		return "", "", fmt.Errorf("creating consumer %s/%s: %w", stream, c.durable, err)
	}
	return stream, c.queue, nil
}

type worker struct {
	c      config
	client *http.Client
	logMu  sync.Mutex
}

var hopByHop = map[string]bool{"Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Proxy-Connection": true, "Te": true, "Trailer": true,
	"Transfer-Encoding": true, "Upgrade": true}

type entry struct {
	TS         string  `json:"ts"`
	Level      string  `json:"level"`
	Msg        string  `json:"msg"`
	Function   string  `json:"function,omitempty"`
	Status     int     `json:"status,omitempty"`
	DurationMs float64 `json:"duration_ms,omitempty"`
	CallID     string  `json:"call_id,omitempty"`
	Error      string  `json:"error,omitempty"`
}

func minDuration(a, b time.Duration) time.Duration {
	if a < b {
		return a
	}
	return b
}

func (w *worker) logLine(e entry) {
	e.TS = time.Now().UTC().Format(time.RFC3339Nano)
	line, _ := json.Marshal(&e)
	w.logMu.Lock()
	os.Stderr.Write(append(line, '\n'))
	w.logMu.Unlock()
}

// handle runs one message: decode, call (with +WPI every ack_wait/4), then ack, nak with a
// back-off delay for a retried status, or term a message that is not a request.
func (w *worker) handle(msg *nats.Msg) {
	var req QueueRequest
	err := json.Unmarshal(msg.Data, &req)
	if err == nil && (req.Function == "" || strings.ContainsAny(req.Function, "/?#% ")) {
		err = fmt.Errorf("bad function name %q", req.Function)
	}
	var hr *http.Request
	if err == nil {
		path := "/" + strings.TrimPrefix(req.Path, "/")
		u := w.c.gateway + "/function/" + req.Function + path
		if req.QueryString != "" {
			u += "?" + req.QueryString
		}
		method := strings.ToUpper(req.Method)
		if method == "" {
			method = http.MethodPost
		}
		if hr, err = http.NewRequest(method, u, bytes.NewReader(req.Body)); err == nil {
			for k, v := range req.Header {
				if !hopByHop[http.CanonicalHeaderKey(k)] {
					hr.Header[k] = v
				}
			}
		}
	}
	if err != nil {
		w.logLine(entry{Level: "warn", Msg: "malformed message; terminated", Error: err.Error()})
		msg.Term()
		return
	}
	var finished int32
	var keepAlive *time.Timer
	keepAlive = time.AfterFunc(w.c.ackWait/4, func() {
		if atomic.LoadInt32(&finished) == 0 {
			msg.InProgress()
			keepAlive.Reset(w.c.ackWait / 4)
		}
	})
	start, status := time.Now(), 503
	resp, err := w.client.Do(hr)
	if err == nil {
		status = resp.StatusCode
		_, err = io.Copy(io.Discard, io.LimitReader(resp.Body, 16<<20))
		resp.Body.Close()
	}
	dur := time.Since(start)
	atomic.StoreInt32(&finished, 1)
	keepAlive.Stop()

	e := entry{Level: "info", Msg: "invoked " + req.Function, Function: req.Function, Status: status,
		DurationMs: float64(dur.Microseconds()) / 1e3, CallID: req.Header.Get("X-Call-Id")}
	if err != nil {
		e.Level, e.Error = "warn", err.Error()
	}
	w.logLine(e)
	if meta, merr := msg.Metadata(); (err != nil || w.c.retryCodes[status]) && merr == nil &&
		int(meta.NumDelivered) < w.c.attempts {
		delay := w.c.retryWait // doubled for each earlier delivery, capped at max_retry_wait
		for i := uint64(1); i < meta.NumDelivered && delay < w.c.maxRetryWait; i++ {
			delay *= 2
		}
		msg.NakWithDelay(minDuration(delay, w.c.maxRetryWait))
		return
	}
	msg.Ack()
}

func main() {
	c := loadConfig()
	nc, err := nats.Connect(c.natsURL, nats.Name("go-worker"), nats.MaxReconnects(-1),
		nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		log.Fatalf("connecting to %s: %v", c.natsURL, err)
	}
	js, err := nc.JetStream()
	if err != nil {
		log.Fatalf("jetstream: %v", err)
	}
	stream, subject, err := ensureQueue(nc, js, c)
	if err != nil {
		log.Fatal(err)
	}
	sub, err := js.PullSubscribe(subject, c.durable, nats.Bind(stream, c.durable))
	if err != nil {
		log.Fatalf("pull subscribe %s/%s: %v", stream, c.durable, err)
	}
	w := &worker{c: c, client: &http.Client{Timeout: c.timeout, Transport: &http.Transport{
		DialContext:  (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns: c.inflight, MaxIdleConnsPerHost: c.inflight, IdleConnTimeout: 90 * time.Second,
	}}}

	mux := http.NewServeMux()
	ok := func(rw http.ResponseWriter, _ *http.Request) { rw.Write([]byte("OK\n")) }
	mux.HandleFunc("/healthz", ok) // ready as soon as it listens: the subscription is made
	mux.HandleFunc("/readyz", ok)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", c.port))
	if err != nil {
		log.Fatalf("metrics port %d: %v", c.port, err)
	}
	go http.Serve(ln, mux)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	slots := make(chan struct{}, c.inflight) // a token per free slot
	for i := 0; i < c.inflight; i++ {
		slots <- struct{}{}
	}
	var wg sync.WaitGroup
	w.logLine(entry{Level: "info", Msg: fmt.Sprintf("ready: stream %s, consumer %s, max_inflight %d",
		stream, c.durable, c.inflight)})
	for ctx.Err() == nil {
		// Wait for one free slot, then take every other free one: Fetch that many.
		select {
		case <-slots:
		case <-ctx.Done():
			continue
		}
		free := 1
	take:
		for free < c.inflight {
			select {
			case <-slots:
				free++
			default:
				break take
			}
		}
		fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		msgs, err := sub.Fetch(free, nats.Context(fctx))
		cancel()
		if err != nil && err != nats.ErrTimeout && err != context.DeadlineExceeded && ctx.Err() == nil {
			w.logLine(entry{Level: "warn", Msg: "fetch failed", Error: err.Error()})
			time.Sleep(100 * time.Millisecond)
		}
		for i := len(msgs); i < free; i++ {
			slots <- struct{}{}
		}
		for _, m := range msgs {
			wg.Add(1)
			go func(m *nats.Msg) {
				defer func() { slots <- struct{}{}; wg.Done() }()
				w.handle(m)
			}(m)
		}
	}

	// SIGTERM: no more fetches; let in-flight calls finish (up to drain_timeout), flush the acks.
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(c.drain):
		w.logLine(entry{Level: "warn", Msg: "drain timeout; in-flight messages will be redelivered"})
	}
	nc.FlushTimeout(2 * time.Second)
	nc.Close()
}
