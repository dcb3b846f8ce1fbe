// The test node's app: it calls the OpenAI API with the official Go SDK, configured only by
// the SDK's own variables (OPENAI_BASE_URL, OPENAI_API_KEY), as an app that knows nothing of
// Backstop would. It sends a steady load on its own, so that a test counts how many of the
// app's calls were answered while it disrupts the cluster, and serves what it saw on /stats.
//
// Settings (environment): LOAD_INTERVAL (default 100ms between calls; 0 sends none until
// resumed), STREAM_EVERY (every Nth call streams; default 3), MODEL (default "chat"),
// STATS_LISTEN (default ":8080"). PUT /load?interval=DURATION changes the pace at run time, and
// &retries=N the SDK's retries (0 by default, so that every failure shows; the SDK's own
// default is 2). Every HTTP attempt is counted too, beneath the SDK's retries.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"log"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// How long one call may take before the app gives up on it.
const callTimeout = 20 * time.Second

type failure struct {
	At    time.Time `json:"at"`
	Error string    `json:"error"`
}

type stats struct {
	mu sync.Mutex
	// Calls sent, answered with content, and failed (an error, or an answer without content).
	Sent     int64 `json:"sent"`
	Answered int64 `json:"answered"`
	Failed   int64 `json:"failed"`
	InFlight int64 `json:"inFlight"`
	// HTTP attempts the SDK made (retries included), and those that failed (no answer, or 5xx/429).
	Attempts       int64 `json:"attempts"`
	AttemptsFailed int64 `json:"attemptsFailed"`
	Retries        int   `json:"retries"`
	// Answered calls by the provider and model Backstop named, and those passed through.
	Providers   map[string]int64 `json:"providers"`
	Passthrough int64            `json:"passthrough"`
	// The last failures, newest last.
	Failures []failure `json:"failures"`
	// The first call's result, made the moment the app started.
	FirstCall string    `json:"firstCall"`
	Started   time.Time `json:"started"`
	Interval  string    `json:"interval"`
}

func (s *stats) answered(provider string, passthrough bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Answered++
	s.InFlight--
	s.Providers[provider]++
	if passthrough {
		s.Passthrough++
	}
}

func (s *stats) failed(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Failed++
	s.InFlight--
	s.Failures = append(s.Failures, failure{At: time.Now(), Error: err.Error()})
	if len(s.Failures) > 50 {
		s.Failures = s.Failures[len(s.Failures)-50:]
	}
}

type app struct {
	client openai.Client
	model  string
	stats  *stats
}

// counting counts every HTTP attempt beneath the SDK.
type counting struct {
	next  http.RoundTripper
	stats *stats
}

func (c counting) RoundTrip(request *http.Request) (*http.Response, error) {
	response, err := c.next.RoundTrip(request)
	c.stats.mu.Lock()
	c.stats.Attempts++
	if err != nil || response.StatusCode >= 500 || response.StatusCode == http.StatusTooManyRequests {
		c.stats.AttemptsFailed++
	}
	c.stats.mu.Unlock()
	return response, err
}

// call makes one chat call, streamed or not, and counts its outcome.
func (a *app) call(stream bool) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	params := openai.ChatCompletionNewParams{
		Model:    openai.ChatModel(a.model),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Say hello.")},
	}
	var response *http.Response
	var text string
	a.stats.mu.Lock()
	retries := option.WithMaxRetries(a.stats.Retries)
	a.stats.mu.Unlock()
	if stream {
		chunks := a.client.Chat.Completions.NewStreaming(ctx, params, option.WithResponseInto(&response), retries)
		for chunks.Next() {
			for _, choice := range chunks.Current().Choices {
				text += choice.Delta.Content
			}
		}
		if err := chunks.Err(); err != nil {
			a.stats.failed(err)
			return
		}
	} else {
		completion, err := a.client.Chat.Completions.New(ctx, params, option.WithResponseInto(&response), retries)
		if err != nil {
			a.stats.failed(err)
			return
		}
		if len(completion.Choices) > 0 {
			text = completion.Choices[0].Message.Content
		}
	}
	if text == "" {
		a.stats.failed(errors.New("an answer without content"))
		return
	}
	provider, passthrough := "", false
	if response != nil {
		provider = response.Header.Get("x-backstop-provider") + "/" + response.Header.Get("x-backstop-model")
		passthrough = response.Header.Get("x-backstop-passthrough") == "true"
		if provider == "/" {
			provider = "direct"
		}
	}
	a.stats.answered(provider, passthrough)
}

func (a *app) start(stream bool) {
	a.stats.mu.Lock()
	a.stats.Sent++
	a.stats.InFlight++
	a.stats.mu.Unlock()
	go a.call(stream)
}

func main() {
	interval, err := time.ParseDuration(env("LOAD_INTERVAL", "100ms"))
	if err != nil {
		log.Fatalf("LOAD_INTERVAL: %v", err)
	}
	streamEvery, err := strconv.Atoi(env("STREAM_EVERY", "3"))
	if err != nil {
		log.Fatalf("STREAM_EVERY: %v", err)
	}
	// The SDK's own retries are off unless asked for, so that every failure is counted.
	counts := &stats{Providers: map[string]int64{}, Failures: []failure{}, Started: time.Now()}
	a := &app{
		client: openai.NewClient(option.WithMaxRetries(0),
			option.WithHTTPClient(&http.Client{Transport: counting{next: http.DefaultTransport, stats: counts}})),
		model: env("MODEL", "chat"),
		stats: counts,
	}
	first, err := a.client.Models.List(context.Background())
	if err != nil {
		a.stats.FirstCall = "error: " + err.Error()
	} else {
		a.stats.FirstCall = "ok: " + strconv.Itoa(len(first.Data)) + " models"
	}
	pace := make(chan time.Duration, 1)
	pace <- interval
	go func() {
		var ticker *time.Ticker
		var ticks <-chan time.Time
		n := 0
		for {
			select {
			case next := <-pace:
				if ticker != nil {
					ticker.Stop()
					ticks = nil
				}
				a.stats.mu.Lock()
				a.stats.Interval = next.String()
				a.stats.mu.Unlock()
				if next > 0 {
					ticker = time.NewTicker(next)
					ticks = ticker.C
				}
			case <-ticks:
				n++
				a.start(streamEvery > 0 && n%streamEvery == 0)
			}
		}
	}()
	http.HandleFunc("/stats", func(w http.ResponseWriter, r *http.Request) {
		a.stats.mu.Lock()
		defer a.stats.mu.Unlock()
		w.Header().Set("content-type", "application/json")
		_ = json.NewEncoder(w).Encode(a.stats)
	})
	http.HandleFunc("/load", func(w http.ResponseWriter, r *http.Request) {
		next, err := time.ParseDuration(r.URL.Query().Get("interval"))
		if r.Method != http.MethodPut || err != nil {
			http.Error(w, "PUT /load?interval=DURATION[&retries=N]", http.StatusBadRequest)
			return
		}
		if text := r.URL.Query().Get("retries"); text != "" {
			retries, err := strconv.Atoi(text)
			if err != nil || retries < 0 {
				http.Error(w, "retries: a number", http.StatusBadRequest)
				return
			}
			a.stats.mu.Lock()
			a.stats.Retries = retries
			a.stats.mu.Unlock()
		}
		pace <- next
	})
	http.HandleFunc("/call", func(w http.ResponseWriter, r *http.Request) {
		count, _ := strconv.Atoi(r.URL.Query().Get("n"))
		for i := 0; i < max(count, 1); i++ {
			a.start(false)
		}
	})
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	log.Fatal(http.ListenAndServe(env("STATS_LISTEN", ":8080"), nil))
}

func env(name, fallback string) string {
	if value, ok := os.LookupEnv(name); ok {
		return value
	}
	return fallback
}
