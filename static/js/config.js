// The chat page's configuration: the view's `chat_config`, a JSON script
// element. Every address the page's scripts use comes from it ("{id}" stands
// for a conversation); none is built here.

import { $ } from "./dom.js";

const node = $("chat-config");

export const config = node ? JSON.parse(node.textContent) : null;

export function urlFor(name, id) {
  return config.urls[name].replace("{id}", id);
}

// Money as the server shows it (conversations/money.py): the site's currency
// sign, at least two decimals, at most six.
export function formatMoney(cost) {
  const n = Number(cost);
  const amount = Number.isFinite(n) ? Math.abs(n) : 0;
  let text = amount.toFixed(6).replace(/0+$/, "");
  const [whole, fraction = ""] = text.split(".");
  text = `${whole}.${fraction.padEnd(2, "0")}`;
  return `${n < 0 ? "-" : ""}${(config && config.currency) || "$"}${text}`;
}
