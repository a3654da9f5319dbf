// The message list's scrolling: it follows the bottom while an answer grows,
// unless the user has scrolled up; then a "jump to latest" button shows.
//
// Only the user unsticks the view from the bottom (wheel, touch, keys, the
// scrollbar), decided at once: layout shifts (a delta, messages measured for
// the first time) never do. Coming back to the bottom sticks again.

const STICK_THRESHOLD = 48; // px from the bottom that still counts as "at the bottom"

export function createScroller({ messages, inner, jump, isStreaming, onJump }) {
  let stuck = true;
  let queued = false;
  let lastTop = messages.scrollTop;
  // Where this code last put the view: the scroll event that follows it must
  // not stick again a view the user has just unstuck (the wheel's own
  // scrolling may not have begun when it arrives).
  let placedAt = null;

  function atBottom() {
    return messages.scrollHeight - messages.scrollTop - messages.clientHeight < STICK_THRESHOLD;
  }

  function update() {
    const show = !stuck && messages.scrollHeight > messages.clientHeight;
    if (jump.hidden === show) jump.hidden = !show;
    jump.classList.toggle("has-new", show && isStreaming());
  }

  // Keep the bottom in view if it was (or always, with `force`): once per
  // frame at most, however many deltas arrive in it.
  function toBottom(force = false) {
    if (force) stuck = true;
    if (!stuck) {
      update();
      return;
    }
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      if (stuck) {
        messages.scrollTop = messages.scrollHeight;
        placedAt = messages.scrollTop;
      }
      update();
    });
  }

  const unstick = () => {
    stuck = false;
  };
  messages.addEventListener(
    "scroll",
    () => {
      const top = messages.scrollTop;
      const placed = top === placedAt;
      placedAt = null;
      // Not while moving up (a smooth wheel scroll starts near the bottom),
      // and not for a scroll this code made.
      if (!placed && top >= lastTop && atBottom()) stuck = true;
      lastTop = top;
      update();
    },
    { passive: true },
  );
  messages.addEventListener("wheel", (event) => event.deltaY < 0 && unstick(), { passive: true });
  let touchY = null;
  messages.addEventListener("touchstart", (event) => (touchY = event.touches[0].clientY), { passive: true });
  messages.addEventListener(
    "touchmove",
    (event) => {
      if (touchY !== null && event.touches[0].clientY > touchY + 4) unstick();
    },
    { passive: true },
  );
  messages.addEventListener("keydown", (event) => {
    if (["PageUp", "ArrowUp", "Home"].includes(event.key)) unstick();
  });
  messages.addEventListener("pointerdown", (event) => {
    if (event.target === messages) unstick(); // the scrollbar
  });
  // Whatever grows the list (a delta, a finished answer's HTML, off-screen
  // messages measured for the first time) keeps the bottom in view if it was.
  jump.addEventListener("click", () => {
    toBottom(true);
    if (onJump) onJump();
  });
  new ResizeObserver(() => {
    if (stuck) toBottom();
    else update();
  }).observe(inner);

  return { toBottom, update };
}
