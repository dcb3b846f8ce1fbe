// The test node's fault upstream: an OpenAI-compatible chat-completions server (whole answers
// and SSE streams) whose failures a test switches at run time, and which records who called it
// with which key, so that a test can see which pods still send to it.
//
// PUT /control with {"mode": "ok" | "fail" | "flap", "status": 503, "periodMs": 2000} sets
// the behaviour: "fail" answers every call with `status`; "flap" alternates between answering
// and failing every `periodMs`. GET /stats returns what it received. NAME (environment) goes
// into every answer; MODE and STATUS set the behaviour at start.
package main

import (
	"encoding/json"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

type control struct {
	Mode     string `json:"mode"`
	Status   int    `json:"status"`
	PeriodMs int64  `json:"periodMs"`
}

type call struct {
	At     time.Time `json:"at"`
	From   string    `json:"from"`
	Key    string    `json:"key"`
	Status int       `json:"status"`
	Stream bool      `json:"stream"`
}

type server struct {
	name    string
	mu      sync.Mutex
	control control
	since   time.Time
	calls   []call
	total   int64
	byKey   map[string]int64
	failed  int64
}

func (s *server) failing(now time.Time) (bool, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch s.control.Mode {
	case "fail":
		return true, s.control.Status
	case "flap":
		period := time.Duration(max(s.control.PeriodMs, 1)) * time.Millisecond
		return (now.Sub(s.since)/period)%2 == 1, s.control.Status
	}
	return false, 0
}

func (s *server) record(r *http.Request, status int, stream bool) {
	from, _, _ := net.SplitHostPort(r.RemoteAddr)
	key := strings.TrimPrefix(r.Header.Get("authorization"), "Bearer ")
	s.mu.Lock()
	defer s.mu.Unlock()
	s.total++
	s.byKey[key]++
	if status != http.StatusOK {
		s.failed++
	}
	s.calls = append(s.calls, call{At: time.Now(), From: from, Key: key, Status: status, Stream: stream})
	if len(s.calls) > 5000 {
		s.calls = s.calls[len(s.calls)-5000:]
	}
}

func (s *server) chat(w http.ResponseWriter, r *http.Request) {
	var request struct {
		Model  string `json:"model"`
		Stream bool   `json:"stream"`
	}
	if err := json.NewDecoder(r.Body).Decode(&request); err != nil {
		http.Error(w, `{"error":{"message":"unreadable request","type":"invalid_request_error"}}`, http.StatusBadRequest)
		return
	}
	if fail, status := s.failing(time.Now()); fail {
		s.record(r, status, request.Stream)
		w.Header().Set("content-type", "application/json")
		w.WriteHeader(status)
		fmt.Fprintf(w, `{"error":{"message":"%s is failing on purpose (%d)","type":"server_error"}}`, s.name, status)
		return
	}
	s.record(r, http.StatusOK, request.Stream)
	text := "Hello from " + s.name + "."
	id := "chatcmpl-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	if !request.Stream {
		w.Header().Set("content-type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"id": id, "object": "chat.completion", "created": time.Now().Unix(), "model": request.Model,
			"choices": []any{map[string]any{"index": 0, "finish_reason": "stop",
				"message": map[string]any{"role": "assistant", "content": text}}},
			"usage": map[string]any{"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
		})
		return
	}
	w.Header().Set("content-type", "text/event-stream")
	flusher, _ := w.(http.Flusher)
	for i, piece := range strings.SplitAfter(text, " ") {
		delta := map[string]any{"content": piece}
		if i == 0 {
			delta["role"] = "assistant"
		}
		chunk, _ := json.Marshal(map[string]any{"id": id, "object": "chat.completion.chunk", "model": request.Model,
			"choices": []any{map[string]any{"index": 0, "delta": delta, "finish_reason": nil}}})
		fmt.Fprintf(w, "data: %s\n\n", chunk)
		if flusher != nil {
			flusher.Flush()
		}
		time.Sleep(5 * time.Millisecond)
	}
	last, _ := json.Marshal(map[string]any{"id": id, "object": "chat.completion.chunk", "model": request.Model,
		"choices": []any{map[string]any{"index": 0, "delta": map[string]any{}, "finish_reason": "stop"}}})
	fmt.Fprintf(w, "data: %s\n\ndata: [DONE]\n\n", last)
}

func main() {
	status, _ := strconv.Atoi(env("STATUS", "503"))
	s := &server{name: env("NAME", "upstream"), control: control{Mode: env("MODE", "ok"), Status: status},
		since: time.Now(), byKey: map[string]int64{}}
	http.HandleFunc("/v1/chat/completions", s.chat)
	http.HandleFunc("/v1/models", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("content-type", "application/json")
		fmt.Fprint(w, `{"object":"list","data":[{"id":"upstream-model","object":"model"}]}`)
	})
	http.HandleFunc("/control", func(w http.ResponseWriter, r *http.Request) {
		var next control
		if r.Method != http.MethodPut || json.NewDecoder(r.Body).Decode(&next) != nil {
			http.Error(w, `PUT {"mode": "ok|fail|flap", "status": 503, "periodMs": 2000}`, http.StatusBadRequest)
			return
		}
		if next.Status == 0 {
			next.Status = http.StatusServiceUnavailable
		}
		s.mu.Lock()
		s.control, s.since = next, time.Now()
		s.mu.Unlock()
	})
	http.HandleFunc("/stats", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		w.Header().Set("content-type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"name": s.name, "control": s.control, "total": s.total,
			"failed": s.failed, "byKey": s.byKey, "calls": s.calls})
	})
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	log.Fatal(http.ListenAndServe(env("LISTEN", ":8000"), nil))
}

func env(name, fallback string) string {
	if value, ok := os.LookupEnv(name); ok {
		return value
	}
	return fallback
}
