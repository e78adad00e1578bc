// The hosts table, kept live: every change the server streams (/events, from the change
// log the engine API's watch reads) updates, adds or removes its row. Text goes in as
// text (textContent), never as HTML: hostnames and reasons come from hosts.
"use strict";

function liveHosts(table) {
  const rows = table.tBodies[0];
  const template = document.getElementById("host-row");
  const empty = document.getElementById("no-hosts");
  const live = document.getElementById("live");
  const wanted = (host) => (!table.dataset.status || host.status === table.dataset.status)
    && (!table.dataset.role || host.role === table.dataset.role);

  function fill(row, host) {
    row.dataset.id = host.id;
    row.dataset.hostname = host.hostname;
    row.className = "status-" + host.status;
    for (const cell of row.querySelectorAll("[data-field]")) {
      cell.textContent = host[cell.dataset.field] ?? "";
    }
    row.querySelector("a").href = "/hosts/" + encodeURIComponent(host.id);
  }

  function place(row) {  // in hostname order, as the server lists them
    const after = [...rows.rows].find((r) => r !== row && r.dataset.hostname > row.dataset.hostname);
    rows.insertBefore(row, after || null);
  }

  function apply(change) {
    const host = change.host;
    let row = [...rows.rows].find((r) => r.dataset.id === host.id);
    if (change.type === "removed" || !wanted(host)) {
      if (row) row.remove();
    } else {
      row = row || template.content.firstElementChild.cloneNode(true);
      fill(row, host);
      place(row);
    }
    empty.hidden = rows.rows.length > 0;
  }

  const say = (text) => { live.textContent = text; };
  const events = new EventSource("/events?since=" + encodeURIComponent(table.dataset.revision));
  events.addEventListener("host", (e) => apply(JSON.parse(e.data)));
  events.addEventListener("reload", () => location.reload());
  events.addEventListener("ended", () => { events.close(); say("session ended: log in again"); });
  events.onopen = () => say("live");
  events.onerror = () => say(events.readyState === EventSource.CLOSED
    ? "not live: reload the page" : "reconnecting…");
}

function copyButtons() {
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", () => {
      const text = document.getElementById(button.dataset.copy).textContent;
      navigator.clipboard.writeText(text).then(() => { button.textContent = "Copied"; });
    });
  }
}

const hosts = document.getElementById("hosts");
if (hosts) liveHosts(hosts);
copyButtons();
