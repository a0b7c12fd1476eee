// Server-sent events over fetch (EventSource cannot POST): call onEvent(obj) for every `data:` JSON event of the
// response until `data: [DONE]` or the end of the stream; an event carrying {error} throws its message.
async function readSSE(res, onEvent) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {  // one event per blank-line-terminated block
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        onEvent(obj);
      }
    }
  }
}
