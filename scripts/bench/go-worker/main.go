// go-worker: the benchmark's Go peer (scripts/bench.sh), a JetStream queue-worker written the
// way the OpenFaaS one is documented: one pull subscription on the durable consumer, Fetch of as
// many messages as there are free slots, a goroutine per message, in-progress acks while the
// function runs, a keep-alive http.Client, an ack when the call is done.
//
// It reads the same environment as queue-worker (nats_url or nats_host/nats_port, nats_stream,
// queue_name, nats_durable, gateway_url, max_inflight, max_ack_pending, ack_wait,
// upstream_timeout, drain_timeout, metrics_port, log_encoding, retry_http_codes,
// max_retry_attempts, initial_retry_wait, max_retry_wait) and creates the same stream and consumer
// when missing. Built in GOPATH mode against Debian's golang-github-nats-io-go-nats-dev (1.22):
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
	"net/url"
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
	Host        string      `json:"Host"`
	Body        []byte      `json:"Body"` // base64 in the JSON; encoding/json decodes it
	Method      string      `json:"Method"`
	Path        string      `json:"Path"`
	QueryString string      `json:"QueryString"`
	Function    string      `json:"Function"`
	QueueName   string      `json:"QueueName"`
	CallbackURL *url.URL    `json:"CallbackUrl"`
}

type config struct {
	natsURL, stream, subject, durable, gateway, logEncoding    string
	maxInflight, maxAckPending, maxAttempts, metricsPort       int
	ackWait, upstreamTimeout, drainTimeout, retryWait, maxWait time.Duration
	retryCodes                                                 map[int]bool
}

func env(name, def string) string {
	if v, ok := os.LookupEnv(name); ok && v != "" {
		return v
	}
	return def
}

func fail(name, value, expected string) {
	fmt.Fprintf(os.Stderr, "go-worker: %s=%q: expected %s\n", name, value, expected)
	os.Exit(2)
}

func envInt(name string, def, min int) int {
	v := env(name, strconv.Itoa(def))
	n, err := strconv.Atoi(v)
	if err != nil || n < min {
		fail(name, v, fmt.Sprintf("a whole number >= %d", min))
	}
	return n
}

// envDuration reads a Go duration; a zero one only when allowZero.
func envDuration(name string, def time.Duration, allowZero bool) time.Duration {
	v := env(name, def.String())
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 || (d == 0 && !allowZero) {
		fail(name, v, "a duration such as 30s or 1m")
	}
	return d
}

func loadConfig() config {
	c := config{
		natsURL: env("nats_url", "nats://"+env("nats_host", "127.0.0.1")+":"+env("nats_port", "4222")),
		stream:  env("nats_stream", "faas-request"),
		durable: env("nats_durable", "faas-workers"),
		gateway: strings.TrimRight(env("gateway_url", "http://127.0.0.1:8080"), "/"),
	}
	c.subject = env("queue_name", c.stream)
	c.maxInflight = envInt("max_inflight", 50, 1)
	def := 1000
	if c.maxInflight > def {
		def = c.maxInflight
	}
	c.maxAckPending = envInt("max_ack_pending", def, c.maxInflight)
	c.maxAttempts = envInt("max_retry_attempts", 100, 1)
	c.metricsPort = envInt("metrics_port", 8081, 0)
	c.ackWait = envDuration("ack_wait", 60*time.Second, false)
	c.upstreamTimeout = envDuration("upstream_timeout", 60*time.Second, false)
	c.drainTimeout = envDuration("drain_timeout", c.upstreamTimeout, true)
	c.retryWait = envDuration("initial_retry_wait", 10*time.Second, true)
	c.maxWait = envDuration("max_retry_wait", 120*time.Second, true)
	c.logEncoding = env("log_encoding", "console")
	c.retryCodes = map[int]bool{}
	for _, s := range strings.Split(env("retry_http_codes", "408,429,500,502,503,504"), ",") {
		code, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			fail("retry_http_codes", s, "comma-separated HTTP status codes")
		}
		c.retryCodes[code] = true
	}
	return c
}

// ensureQueue creates the stream and the durable pull consumer as queue-worker does
// (src/broker.rs): work-queue file stream on queue_name; explicit acks, deliver all, unlimited
// deliveries, max_waiting max(2 x max_inflight, 512), max_ack_pending as configured.
func ensureQueue(js nats.JetStreamContext, c config) error {
	if _, err := js.StreamInfo(c.stream); err == nats.ErrStreamNotFound {
		_, err = js.AddStream(&nats.StreamConfig{Name: c.stream, Subjects: []string{c.subject},
			Retention: nats.WorkQueuePolicy, Storage: nats.FileStorage, Replicas: 1})
		if err != nil && err != nats.ErrStreamNameAlreadyInUse {
			return fmt.Errorf("creating stream %s: %w", c.stream, err)
		}
	} else if err != nil {
		return fmt.Errorf("reading stream %s: %w", c.stream, err)
	}
	if _, err := js.ConsumerInfo(c.stream, c.durable); err == nats.ErrConsumerNotFound {
		maxWaiting := 2 * c.maxInflight
		if maxWaiting < 512 {
			maxWaiting = 512
		}
		_, err = js.AddConsumer(c.stream, &nats.ConsumerConfig{Durable: c.durable,
			DeliverPolicy: nats.DeliverAllPolicy, AckPolicy: nats.AckExplicitPolicy,
			AckWait: c.ackWait, FilterSubject: c.subject, ReplayPolicy: nats.ReplayInstantPolicy,
			MaxWaiting: maxWaiting, MaxAckPending: c.maxAckPending})
		if err != nil {
			if _, again := js.ConsumerInfo(c.stream, c.durable); again != nil {
				return fmt.Errorf("creating consumer %s/%s: %w", c.stream, c.durable, err)
			}
		}
	} else if err != nil {
		return fmt.Errorf("reading consumer %s/%s: %w", c.stream, c.durable, err)
	}
	return nil
}

type worker struct {
	c                   config
	client              *http.Client
	logMu               sync.Mutex
	processed, inflight int64
}

var hopByHop = map[string]bool{"Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Proxy-Connection": true, "Te": true, "Trailer": true,
	"Transfer-Encoding": true, "Upgrade": true}

// entry is one log line: a JSON object with log_encoding=json, else key=value text.
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

func (w *worker) logLine(e entry) {
	e.TS = time.Now().UTC().Format(time.RFC3339Nano)
	var line []byte
	if w.c.logEncoding == "json" {
		line, _ = json.Marshal(&e)
	} else {
		line = []byte(fmt.Sprintf("%s %s %s function=%s status=%d duration_ms=%.3f call_id=%s error=%q",
			e.TS, e.Level, e.Msg, e.Function, e.Status, e.DurationMs, e.CallID, e.Error))
	}
	w.logMu.Lock()
	os.Stderr.Write(append(line, '\n'))
	w.logMu.Unlock()
}

// handle runs one message: decode, call, ack (or nak with a delay for a retry, or term when it
// can never succeed). The lease is kept alive with +WPI every ack_wait/4 while the call runs.
func (w *worker) handle(msg *nats.Msg) {
	var req QueueRequest
	err := json.Unmarshal(msg.Data, &req)
	if err == nil && (req.Function == "" || strings.ContainsAny(req.Function, "/?#% ")) {
		err = fmt.Errorf("bad function name %q", req.Function)
	}
	var hr *http.Request
	if err == nil {
		hr, err = w.newRequest(&req)
	}
	if err != nil {
		w.logLine(entry{Level: "warn", Msg: "malformed message; terminated",
			Function: req.Function, Error: err.Error()})
		msg.Term()
		return
	}
	var keepAlive *time.Timer
	var finished int32
	keepAlive = time.AfterFunc(w.c.ackWait/4, func() {
		if atomic.LoadInt32(&finished) == 0 {
			msg.InProgress()
			keepAlive.Reset(w.c.ackWait / 4)
		}
	})
	status, body, dur, err := w.invoke(hr)
	atomic.StoreInt32(&finished, 1)
	keepAlive.Stop()

	e := entry{Level: "info", Msg: "invoked " + req.Function + ": " + strconv.Itoa(status),
		Function: req.Function, Status: status, DurationMs: float64(dur.Microseconds()) / 1e3,
		CallID: req.Header.Get("X-Call-Id")}
	if err != nil {
		e.Level, e.Msg, e.Error = "warn", "invoking "+req.Function+" failed", err.Error()
	}
	w.logLine(e)
	if err != nil || w.c.retryCodes[status] {
		if meta, merr := msg.Metadata(); merr == nil && int(meta.NumDelivered) < w.c.maxAttempts {
			// Exponential back-off from initial_retry_wait, capped at max_retry_wait.
			delay := w.c.retryWait
			for i := uint64(1); i < meta.NumDelivered && delay < w.c.maxWait; i++ {
				delay *= 2
			}
			if delay > w.c.maxWait {
				delay = w.c.maxWait
			}
			msg.NakWithDelay(delay)
			return
		}
	}
	if req.CallbackURL != nil && req.CallbackURL.Host != "" {
		w.callback(&req, status, body, dur)
	}
	msg.Ack()
	atomic.AddInt64(&w.processed, 1)
}

// newRequest is the call of {gateway_url}/function/{Function}{Path or /}?{QueryString} with the
// queued method (POST when empty), body and headers (less the hop-by-hop ones).
func (w *worker) newRequest(req *QueueRequest) (*http.Request, error) {
	path := req.Path
	if path == "" {
		path = "/"
	} else if path[0] != '/' {
		path = "/" + path
	}
	u := w.c.gateway + "/function/" + req.Function + path
	if req.QueryString != "" {
		u += "?" + req.QueryString
	}
	method := strings.ToUpper(req.Method)
	if method == "" {
		method = http.MethodPost
	}
	hr, err := http.NewRequest(method, u, bytes.NewReader(req.Body))
	if err != nil {
		return nil, err
	}
	for k, v := range req.Header {
		if !hopByHop[http.CanonicalHeaderKey(k)] {
			hr.Header[k] = v
		}
	}
	return hr, nil
}

func (w *worker) invoke(hr *http.Request) (int, []byte, time.Duration, error) {
	start := time.Now()
	resp, err := w.client.Do(hr)
	if err != nil {
		return 503, nil, time.Since(start), err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	resp.Body.Close()
	return resp.StatusCode, body, time.Since(start), err
}

func (w *worker) callback(req *QueueRequest, status int, body []byte, dur time.Duration) {
	cb := *req.CallbackURL
	cb.User = nil // the gateway's JSON drops the password, so no userinfo can be rebuilt
	hr, err := http.NewRequest(http.MethodPost, cb.String(), bytes.NewReader(body))
	if err != nil {
		return
	}
	hr.Header.Set("X-Call-Id", req.Header.Get("X-Call-Id"))
	hr.Header.Set("X-Function-Status", strconv.Itoa(status))
	hr.Header.Set("X-Function-Name", req.Function)
	hr.Header.Set("X-Duration-Seconds", strconv.FormatFloat(dur.Seconds(), 'f', 6, 64))
	if resp, err := w.client.Do(hr); err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	} else {
		w.logLine(entry{Level: "warn", Msg: "callback failed", Function: req.Function, Error: err.Error()})
	}
}

func main() {
	c := loadConfig()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	nc, err := nats.Connect(c.natsURL, nats.Name("go-worker"), nats.MaxReconnects(-1),
		nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		log.Fatalf("connecting to %s: %v", c.natsURL, err)
	}
	js, err := nc.JetStream()
	if err != nil {
		log.Fatalf("jetstream: %v", err)
	}
	if err := ensureQueue(js, c); err != nil {
		log.Fatal(err)
	}
	sub, err := js.PullSubscribe(c.subject, c.durable, nats.Bind(c.stream, c.durable))
	if err != nil {
		log.Fatalf("pull subscribe %s/%s: %v", c.stream, c.durable, err)
	}
	w := &worker{c: c, client: &http.Client{Timeout: c.upstreamTimeout, Transport: &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        c.maxInflight,
		MaxIdleConnsPerHost: c.maxInflight,
		IdleConnTimeout:     90 * time.Second,
	}}}

	var ready int32
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(rw http.ResponseWriter, _ *http.Request) { rw.Write([]byte("OK\n")) })
	mux.HandleFunc("/readyz", func(rw http.ResponseWriter, _ *http.Request) {
		if atomic.LoadInt32(&ready) == 0 {
			rw.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	mux.HandleFunc("/metrics", func(rw http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(rw, "queue_worker_messages_processed_total %d\nqueue_worker_inflight %d\n",
			atomic.LoadInt64(&w.processed), atomic.LoadInt64(&w.inflight))
	})
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", c.metricsPort))
	if err != nil {
		log.Fatalf("metrics port %d: %v", c.metricsPort, err)
	}
	go http.Serve(ln, mux)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	slots := make(chan struct{}, c.maxInflight) // a token per free slot
	for i := 0; i < c.maxInflight; i++ {
		slots <- struct{}{}
	}
	var wg sync.WaitGroup
	atomic.StoreInt32(&ready, 1)
	w.logLine(entry{Level: "info", Msg: fmt.Sprintf("ready: stream %s, consumer %s, max_inflight %d",
		c.stream, c.durable, c.maxInflight)})

	for ctx.Err() == nil {
		// Wait for one free slot, then take every other free one: Fetch that many.
		select {
		case <-slots:
		case <-ctx.Done():
			continue
		}
		free := 1
	take:
		for free < c.maxInflight {
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
			atomic.AddInt64(&w.inflight, 1)
			go func(m *nats.Msg) {
				defer func() { atomic.AddInt64(&w.inflight, -1); slots <- struct{}{}; wg.Done() }()
				w.handle(m)
			}(m)
		}
	}

	// SIGTERM: no more fetches; let in-flight calls finish (up to drain_timeout), flush the acks.
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(c.drainTimeout):
		w.logLine(entry{Level: "warn", Msg: "drain timeout; in-flight messages will be redelivered"})
	}
	nc.FlushTimeout(2 * time.Second)
	nc.Close()
}
