// The Users page: every user with their role; an admin creates users and changes roles
// (the API refuses the others, and the page shows them no controls).
import { api } from "./api.js";

const $ = (id) => document.getElementById(id);
const ROLES = ["viewer", "operator", "admin"];
let ui = null;

function isAdmin() {
  return document.body.dataset.role === "admin";
}

/** A role cell: a select that changes the role at once for admins, plain text otherwise. */
function roleCell(u) {
  // A single sign-on user's role comes from the provider at each sign-in.
  if (!isAdmin() || u.sso) {
    return ui.el("td", { "data-testid": "user-role" }, u.sso ? `${u.role} (single sign-on)` : u.role);
  }
  const sel = ui.el("select", { class: "short", "aria-label": "Role of " + u.name, "data-testid": "user-role-select", "data-user": u.name },
    ROLES.map((r) => ui.el("option", { value: r, selected: r === u.role }, r)));
  sel.addEventListener("change", async () => {
    $("user-message").textContent = "";
    const done = await ui.guarded($("users-error"), () =>
      api("PATCH", "/users/" + encodeURIComponent(u.name), { role: sel.value }));
    if (done) $("user-message").textContent = `${u.name} is ${done.role} now.`;
    loadUsers();
  });
  return ui.el("td", {}, sel);
}

/** Reads and shows the users. */
export async function loadUsers() {
  const users = await ui.guarded($("users-error"), () => api("GET", "/users"));
  if (!users) return;
  $("users-table").tBodies[0].replaceChildren(...users.map((u) =>
    ui.el("tr", { "data-testid": "user-row", "data-user": u.name, "data-role": u.role },
      ui.el("td", {}, u.name), roleCell(u), ui.el("td", {}, ui.when(u.created_at)))));
}

/** Wires the page to the app's helpers: `guarded`, `when` and `el`. */
export function setUpUsers(helpers) {
  ui = helpers;
  $("user-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = $("user-name").value.trim();
    const password = $("user-password").value;
    const role = $("user-role").value;
    $("user-message").textContent = "";
    if (!name || !password) {
      ui.guarded($("user-error"), () => { throw new Error("Enter a name and a password."); });
      return;
    }
    $("user-create").disabled = true;
    try {
      const made = await ui.guarded($("user-error"), () => api("POST", "/users", { name, password, role }));
      if (!made) return;
      $("user-message").textContent = `User ${made.name} created as ${made.role}.`;
      $("user-name").value = "";
      $("user-password").value = "";
      loadUsers();
    } finally {
      $("user-create").disabled = false;
    }
  });
}
