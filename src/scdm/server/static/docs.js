// /docs: Swagger UI over this server's OpenAPI document (a file, not an inline script: see the CSP).
"use strict";
if (window.SwaggerUIBundle) {
  window.ui = window.SwaggerUIBundle({url: document.body.dataset.openapi, dom_id: "#swagger-ui", deepLinking: true});
} else {
  document.getElementById("swagger-ui").textContent =
    "Swagger UI could not be loaded; the API description itself is at " + document.body.dataset.openapi + ".";
}
