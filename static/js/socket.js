// The websocket: connects, reassembles long frames (`frame.part`), and
// reconnects with a growing back-off (at once when the worker restarts for a
// deploy; every 30 s after 4429, too many sockets of this user), never after
// 4401 (the session is gone).

const BACKOFF_MIN = 500;
const BACKOFF_MAX = 10000;
const CROWDED_RETRY = 30000; // ms: 4429, too many sockets of this user

export function createSocket({ path, onOpen, onFrame, onStatus, onEnded }) {
  let socket = null;
  let backoff = BACKOFF_MIN;
  let timer = null;
  let everOpened = false;

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  function connect() {
    clearTimeout(timer);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}${path}`);
    socket = ws;

    ws.addEventListener("open", () => {
      const again = everOpened;
      everOpened = true;
      backoff = BACKOFF_MIN;
      onStatus(null);
      onOpen(again); // on load: follow the conversation; after a reconnect: say how far we got
    });

    let parts = []; // a long frame arrives as consecutive `frame.part` messages
    ws.addEventListener("message", (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
        if (frame.type === "frame.part") {
          if (frame.part === 0) parts = [];
          parts.push(frame.data);
          if (frame.part < frame.parts - 1) return;
          frame = JSON.parse(parts.join(""));
          parts = [];
        }
      } catch {
        return;
      }
      onFrame(frame);
    });

    ws.addEventListener("close", (event) => {
      if (socket !== ws) return;
      socket = null;
      if (event.code === 4401) {
        onEnded();
        return;
      }
      // 4012 (or 1012): the worker is restarting (a deploy); another one takes us at once.
      const restart = event.code === 4012 || event.code === 1012;
      let delay = restart ? 100 + Math.random() * 400 : backoff;
      if (!restart) backoff = Math.min(backoff * 2, BACKOFF_MAX);
      if (event.code === 4429) {
        // Too many open tabs of this account: wait for one to close.
        delay = CROWDED_RETRY;
        onStatus("Too many chat tabs are open for your account. Close one; this tab tries again every 30 s.");
      } else if (event.code === 4008 || event.code === 1008) {
        delay = BACKOFF_MAX; // the server judged this page's frames abusive: no hurry
        onStatus("The server closed the connection. Reconnecting…");
      } else {
        onStatus("Reconnecting…");
      }
      timer = setTimeout(connect, delay);
    });
  }

  return { connect, send, isOpen: () => Boolean(socket) && socket.readyState === WebSocket.OPEN };
}
